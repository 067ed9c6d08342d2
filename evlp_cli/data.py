"""``evlp data synth|download|info|verify|cache-teacher``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Fetch, synthesise and inspect datasets.", no_args_is_help=True)
download_app = typer.Typer(help="Fetch and prepare a dataset under one data root (resumable; re-run to continue).",
                           no_args_is_help=True)
app.add_typer(download_app, name="download")

_OUT = typer.Option(Path("data"), "--out", "-o", help="Data root; each dataset gets its own folder in it.")
_IMAGE_SIZE = typer.Option(256, "--image-size", min=0, help="Shorter image side after resizing (0 = keep originals).")
_SHARD_SIZE = typer.Option(10000, "--shard-size", min=1, help="Samples per webdataset shard.")


@app.command("synth")
def synth(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (train shards + test index)."),
    train: int = typer.Option(20000, "--train", min=1, help="Training samples (webdataset shards)."),
    test: int = typer.Option(500, "--test", min=1, help="Held-out test images (Karpathy-style index)."),
    val: int = typer.Option(0, "--val", min=0, help="Held-out validation images."),
    seed: int = typer.Option(0, "--seed", help="Everything written depends only on this seed."),
    image_size: int = typer.Option(64, "--image-size", min=16, help="Image side in pixels."),
) -> None:
    """Write a synthetic image-caption set (coloured shapes, compositional captions) in the real layouts."""
    from evlp.data.synth import synthesize
    from evlp_cli import _render

    _render.synth_summary(synthesize(out, n_train=train, n_test=test, n_val=val, seed=seed, image_size=image_size))


def _cc(name: str, out: Path, index: Optional[Path], image_size: int, shard_size: int, processes: Optional[int],
        threads: int, timeout: float, stall_timeout: float, retry_failed: bool, limit: Optional[int]) -> None:
    from evlp.data.download.cc import CCOptions, download_cc
    from evlp_cli import _render

    options = CCOptions(image_size=image_size, shard_size=shard_size, threads=threads, timeout=timeout,
                        stall_timeout=stall_timeout, retry_failed=retry_failed, limit=limit)
    if processes is not None:
        options.processes = processes
    with _render.CountProgress(f"download {name}") as progress:
        result = download_cc(name, out, index=str(index) if index else None, options=options, progress=progress)
    _render.cc_summary(name, result)


_PROCESSES = typer.Option(None, "--processes", min=1, help="Download processes (default: CPU count).")
_THREADS = typer.Option(64, "--threads", min=1, help="Threads per process.")
_TIMEOUT = typer.Option(10.0, "--timeout", min=0.1, help="Seconds per URL.")
_STALL = typer.Option(300.0, "--stall-timeout", min=1.0, help="Watchdog: stop when nothing progresses this long.")
_RETRY = typer.Option(False, "--retry-failed", help="Fetch again only the rows that failed before.")
_LIMIT = typer.Option(None, "--limit", min=1, help="Only the first N rows (smoke runs).")


def _cc_command(name: str, index_help: str, doc: str) -> None:
    """Register ``evlp data download <name>`` (CC3M and CC12M take the same options but the index)."""

    def command(
        index: Optional[Path] = typer.Option(None, "--index", help=index_help),
        out: Path = _OUT, image_size: int = _IMAGE_SIZE, shard_size: int = _SHARD_SIZE,
        processes: Optional[int] = _PROCESSES, threads: int = _THREADS, timeout: float = _TIMEOUT,
        stall_timeout: float = _STALL, retry_failed: bool = _RETRY, limit: Optional[int] = _LIMIT,
    ) -> None:
        _cc(name, out, index, image_size, shard_size, processes, threads, timeout, stall_timeout, retry_failed,
            limit)

    command.__doc__ = doc
    download_app.command(name)(command)


_cc_command("cc3m", "Train-GCC-training.tsv (caption TAB url), downloaded by hand from the Conceptual Captions site.",
            "Conceptual Captions 3M with img2dataset: resized webdataset shards, failures by reason.")
_cc_command("cc12m", "cc12m.tsv (url TAB caption); default: the public index URL.",
            "Conceptual 12M with img2dataset: resized webdataset shards, failures by reason.")


def _sources(urls: Optional[list[str]], allowed: tuple[str, ...]) -> dict[str, str]:
    from evlp.errors import ConfigError

    found: dict[str, str] = {}
    for item in urls or []:
        key, sep, url = item.partition("=")
        if not sep or key not in allowed:
            raise ConfigError(f"--url {item}: use NAME=URL with NAME one of {', '.join(allowed)}")
        found[key] = url
    return found


@download_app.command("coco")
def coco(
    out: Path = _OUT, image_size: int = _IMAGE_SIZE, shard_size: int = _SHARD_SIZE,
    url: Optional[list[str]] = typer.Option(None, "--url", help="Override a source: train_zip=URL, val_zip=URL or "
                                            "karpathy_zip=URL (repeatable)."),
    keep_archives: bool = typer.Option(True, "--keep-archives/--delete-archives", help="Keep the zips afterwards."),
) -> None:
    """COCO 2014 + Karpathy splits: train+restval as shards, val/test as a retrieval index."""
    from evlp.data.download.coco import CocoSources, download_coco
    from evlp_cli import _render

    sources = CocoSources(**_sources(url, ("train_zip", "val_zip", "karpathy_zip")))
    with _render.StageProgress() as progress:
        manifest = download_coco(out, sources=sources, image_size=image_size, shard_size=shard_size,
                                 progress=progress, keep_archives=keep_archives)
    _render.manifest_summary(manifest, out / "coco")


@download_app.command("flickr")
def flickr(
    archive: Optional[Path] = typer.Option(None, "--archive", help="flickr30k-images.tar.gz (or .zip) you obtained; "
                                           "run without it for the steps."),
    karpathy: Optional[Path] = typer.Option(None, "--karpathy", help="dataset_flickr30k.json or caption_datasets.zip "
                                            "(default: downloaded)."),
    out: Path = _OUT, image_size: int = _IMAGE_SIZE, shard_size: int = _SHARD_SIZE,
) -> None:
    """Flickr30K (gated: you supply the image archive) + Karpathy splits, laid out like COCO."""
    from evlp.data.download.flickr import download_flickr
    from evlp_cli import _render

    with _render.StageProgress() as progress:
        manifest = download_flickr(out, archive=archive, karpathy=karpathy, image_size=image_size,
                                   shard_size=shard_size, progress=progress)
    _render.manifest_summary(manifest, out / "flickr30k")


@download_app.command("imagenet")
def imagenet(
    out: Path = _OUT,
    token: Optional[str] = typer.Option(None, "--token", help="Hugging Face token (default: the logged-in one)."),
    from_dir: Optional[Path] = typer.Option(None, "--from-dir", help="An ImageFolder (train/ val/ of wnid folders) or "
                                            "a folder of the hub's train_images_*.tar.gz / val_images.tar.gz."),
) -> None:
    """ImageNet-1k from the Hugging Face hub (gated) or a local copy, as an ImageFolder in the standard class order."""
    from evlp.data.download.imagenet import download_imagenet
    from evlp_cli import _render

    with _render.StageProgress() as progress:
        manifest = download_imagenet(out, token=token, from_dir=from_dir, progress=progress)
    _render.manifest_summary(manifest, out / "imagenet")


@download_app.command("glue")
def glue(
    out: Path = _OUT,
    task: str = typer.Option("all", "--task", help="all, cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte or wnli."),
    from_dir: Optional[Path] = typer.Option(None, "--from-dir", help="The original GLUE TSV folders (glue_data/)."),
) -> None:
    """GLUE from the Hugging Face hub or the original TSVs, normalised to one JSONL format per task."""
    from evlp.data.download.glue import download_glue
    from evlp_cli import _render

    with _render.StageProgress() as progress:
        manifests = download_glue(out, task=task, from_dir=from_dir, progress=progress)
    for name, manifest in manifests.items():
        _render.manifest_summary(manifest, out / "glue" / name)


@app.command("info")
def info(root: Path = typer.Argument(Path("data"), help="Data root.")) -> None:
    """What datasets, splits, counts and bytes a data root holds, and what is missing."""
    from evlp.data.inspect import data_info
    from evlp_cli import _render

    _render.data_info_table(root, data_info(root))


@app.command("verify")
def verify(
    root: Path = typer.Argument(Path("data"), help="Data root."),
    dataset: Optional[list[str]] = typer.Option(None, "--dataset", help="Only these datasets (repeatable)."),
    quick: bool = typer.Option(False, "--quick", help="Check image headers instead of decoding every image."),
) -> None:
    """Open every shard and file, decode every image, and check counts against the manifests (exit 1 on problems)."""
    from evlp.data.inspect import verify_data
    from evlp_cli import _render

    with _render.StageProgress() as progress:
        reports = verify_data(root, datasets=dataset, progress=progress, decode=not quick)
    if not _render.verify_table(reports):
        raise typer.Exit(1)


@app.command("cache-teacher")
def cache_teacher(
    config: str = typer.Option("s_smke", "--config", "-c", help="The pretraining recipe (name or YAML) whose "
                               "teacher and shards to use: the same as the pretraining run's."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="The training shards (data.root)."),
    root: Optional[Path] = typer.Option(None, "--root", help="Data root (paths.data)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=1, help="Images per teacher forward pass."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    overrides: Optional[list[str]] = typer.Argument(None, metavar="[KEY=VALUE]...",
                                                    help="Config overrides, as for `evlp pretrain`."),
) -> None:
    """Compute the frozen teacher's target of every training sample once (its evaluation view) into files beside
    the shards; resumable, split over the processes of a launcher. Then pretrain with model.teacher.cache=true."""
    from evlp.config.commands import resolve_training_config
    from evlp.train.cache_teacher import cache_teacher as run
    from evlp_cli import _render

    cfg = resolve_training_config("pretrain", config=config, overrides=overrides or [], data=data, root=root)
    with _render.CountProgress("teacher targets (shards)") as progress:
        result = run(cfg, batch_size=batch_size, device=device, progress=progress)
    _render.info(f"tag {result.tag}: {result.written} shard(s) written ({result.samples:,} samples, "
                 f"{result.unreadable:,} without a readable image), {result.kept} already cached, "
                 f"{result.seconds:,.1f} s")
