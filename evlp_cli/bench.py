"""``evlp bench train|data|eval``: throughput, step time, memory and utilisation (the work is in
:mod:`evlp.bench`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from evlp_cli._common import OVERRIDES, ROOT, recipe_completer

app = typer.Typer(help="Measure evlp's speed: the training step, the data pipeline, the evaluation encoders.",
                  no_args_is_help=True)

_JSON = typer.Option(None, "--json", help="Also write the figures as JSON to this file ('-' = stdout only JSON).")
_DEVICE = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available).")


def _emit(result: dict[str, Any], json_out: Optional[Path], title: str) -> None:
    import json

    from evlp_cli import _render

    if json_out is not None and str(json_out) == "-":
        print(json.dumps(result))
        return
    _render.bench_table(title, result)
    if json_out is not None:
        from evlp.io import write_json

        write_json(json_out, result)
        _render.info(f"written to {json_out}")


@app.command("train")
def train(
    config: str = typer.Option("s_smke", "--config", "-c", autocompletion=recipe_completer("pretrain"),
                               help="Pretraining recipe (name or YAML)."),
    steps: int = typer.Option(10, "--steps", min=1, help="Timed steps (the median is reported)."),
    warmup: int = typer.Option(2, "--warmup", min=0, help="Untimed steps first."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="Per-step batch (default: "
                                             "the recipe's train.batch_size)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Training shards to read (default: the recipe's "
                                       "data.root when it holds shards, else a temporary synthetic set)."),
    root: Optional[Path] = ROOT,
    device: Optional[str] = _DEVICE,
    json_out: Optional[Path] = _JSON,
    overrides: Optional[list[str]] = OVERRIDES,
) -> None:
    """The pretraining step: samples/s, step time, MFU against the matmul rate measured here, peak memory, phases.

    Student + frozen teacher + ITC + KD against a full memory bank + AdamW, on the real data pipeline, with
    random weights (nothing is downloaded).
    """
    from evlp.bench.train import bench_train
    from evlp.config.commands import resolve_training_config

    extra = [*(overrides or []), *([f"train.batch_size={batch_size}"] if batch_size else [])]
    cfg = resolve_training_config("pretrain", config=config, overrides=extra, data=data, root=root)
    result = bench_train(cfg, steps=steps, warmup=warmup, device=device)
    result = {"config": config, "overrides": extra, **result}
    _emit(result, json_out, f"bench train · {config} · batch {result['batch_size']} · {result['device']}")


@app.command("data")
def data_cmd(
    data: str = typer.Option(..., "--data", "-d", help="Training shards (a folder of NNNNN.tar) or a folder of "
                             "images."),
    root: Optional[Path] = ROOT,
    workers: int = typer.Option(1, "--workers", "-w", min=0, help="DataLoader workers (0 = in this process)."),
    images: Optional[int] = typer.Option(None, "--images", min=1, help="Images to time (default: a few hundred)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="Images per batch (default: "
                                             "the recipe's train.batch_size, what a pretraining worker builds)."),
    config: str = typer.Option("s_smke", "--config", "-c", autocompletion=recipe_completer("pretrain"),
                               help="Pretraining recipe whose image pipeline to measure."),
    draft: bool = typer.Option(True, "--draft/--no-draft", help="JPEG draft decoding (--no-draft: decode every "
                               "image in full first, the pipeline before it, for comparison)."),
    json_out: Optional[Path] = _JSON,
    overrides: Optional[list[str]] = OVERRIDES,
) -> None:
    """The pretraining image pipeline: augmented images/s per worker and in total, next to plain decoding.

    With data.augment_on=device (the default on a GPU) the workers' half is timed, and the batched half
    (crop-resize, flip, jitter, normalise) separately on the device.
    """
    from evlp.bench.data import bench_data
    from evlp.config.commands import resolve_training_config
    from evlp_cli._common import resolve_data

    folder = resolve_data(data, root)
    cfg = resolve_training_config("pretrain", config=config, overrides=overrides or [], data=str(folder))
    kwargs: dict[str, Any] = {"workers": workers, "config": cfg, "draft": draft,
                              "batch_size": batch_size or cfg.train.batch_size}
    if images is not None:
        kwargs["images"] = images
    result = bench_data(folder, **kwargs)
    _emit({"data": str(folder), **result}, json_out, f"bench data · {folder} · {workers} worker(s)")


@app.command("eval")
def eval_cmd(
    ckpt: Path = typer.Option(..., "--ckpt", help="Run folder, checkpoint or exported model."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=1),
    device: Optional[str] = _DEVICE,
    json_out: Optional[Path] = _JSON,
) -> None:
    """Image and text embeddings/s of a trained model (the cost of retrieval and zero-shot evaluation)."""
    from evlp.bench.eval import bench_eval

    result = bench_eval(str(ckpt), batch_size=batch_size, device=device)
    _emit(result, json_out, f"bench eval · {ckpt} · {result['device']}")
