"""Evaluation split over two CPU ranks (gloo, ``accelerate launch``) gives exactly the single-process metrics.

Every set has an odd size, so the ranks get unequal shares (4 + 3 ...): a padded or repeated item would show
as a different metric, or as an image without captions. One launch runs, on both ranks, ``evlp eval retrieval``
(the CLI's own command), ``evaluate_zeroshot`` and the validation of three fine-tuning tasks (ImageNet top-k,
GLUE STS-B correlations, retrieval R@K); the test process computes each of them again in one process.

The file is also the launched program: ``python -m tests.integration.test_eval_ranks RUN ROOT OUT``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, cli_env

N_IMAGES, N_CLASSES = 7, 4  # the retrieval split: 7 images, 35 captions; the shapes val split: 4 * 3 - 1 = 11
N_GLUE_VAL = 7


@pytest.fixture(scope="module")
def odd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``synth7/`` (retrieval: 7 test images, a small train shard), ``shapes/`` (11 val images in 4 classes) and
    ``glue/stsb/`` (7 validation rows)."""
    import random

    from evlp.data.synth import synthesize
    from tests.integration.test_finetune_glue import _stsb, _write
    from tests.integration.test_finetune_imagenet import make_shapes

    root = tmp_path_factory.mktemp("odd")
    synthesize(root / "synth7", n_train=8, n_test=N_IMAGES, seed=2, shard_size=8)
    make_shapes(root / "shapes", n_train=2, n_val=3, size=32)
    max((root / "shapes" / "val").rglob("*.png")).unlink()
    rng = random.Random(3)
    _write(root, "stsb", "train", _stsb(rng, 4))
    _write(root, "stsb", "validation", _stsb(rng, N_GLUE_VAL))
    return root


def _validations(run: Path, root: Path, out: Path, dist: Any) -> dict[str, dict[str, float]]:
    """Each fine-tuning task's validation of its starting point, as ``fit`` calls it (same seed on every rank)."""
    from accelerate.utils import set_seed

    from evlp.config import load_config
    from evlp.config.glue import GlueConfig
    from evlp.config.imagenet import ImageNetConfig
    from evlp.config.retrieval import RetrievalFinetuneConfig
    from evlp.train.glue import GlueTask
    from evlp.train.imagenet import ImageNetTask
    from evlp.train.retrieval import RetrievalFinetuneTask

    common = [f"ckpt={run}", f"data={root}", f"out={out}"]
    tasks = {
        "imagenet": ImageNetTask(load_config(ImageNetConfig, "tiny", [*common, "eval_batch_size=4"],
                                             command="imagenet")),
        "glue": GlueTask(load_config(GlueConfig, "tiny", [*common, "task=stsb", "eval_batch_size=2"], command="glue")),
        "retrieval": RetrievalFinetuneTask(load_config(RetrievalFinetuneConfig, "tiny",
                                                       [*common, "dataset=synth7", "eval_batch_size=4"],
                                                       command="retrieval")),
    }
    scores = {}
    for name, task in tasks.items():
        set_seed(0)
        scores[name] = task.evaluate(task.build_module(), dist)
    return scores


def _worker(run: Path, root: Path, out: Path) -> None:
    """One rank: the eval command as a user runs it, zero-shot through the library, then the validations."""
    from evlp.dist import dist_info
    from evlp.eval.zeroshot import ZeroShotConfig, evaluate_zeroshot
    from evlp_cli.main import app

    app(["eval", "retrieval", "--ckpt", str(run), "--data", str(root / "synth7"), "--num-workers", "0",
         "--batch-size", "3", "--out", str(out / "retrieval.json")], standalone_mode=False)
    dist = dist_info()  # the command joined the launcher's process group
    zs = evaluate_zeroshot(ZeroShotConfig(ckpt=str(run), data=str(root / "shapes"), templates=None,
                                          out=str(out / "zeroshot.json"), batch_size=4, num_workers=0))
    record = {"rank": dist.rank, "world_size": dist.world_size, "zeroshot": zs.to_json(), "zeroshot_path": zs.path,
              "validation": _validations(run, root, out / "ft", dist)}
    (out / f"rank{dist.rank}.json").write_text(json.dumps(record))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_two_ranks_give_the_single_process_metrics(tiny_run: Path, odd_root: Path, tmp_path: Path) -> None:
    from evlp.dist import DistInfo
    from evlp.eval.runner import RetrievalEvalConfig, evaluate_retrieval
    from evlp.eval.zeroshot import ZeroShotConfig, evaluate_zeroshot

    two = tmp_path / "two"
    two.mkdir()
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), "-m", "tests.integration.test_eval_ranks", str(tiny_run), str(odd_root), str(two)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO,
                          env=cli_env(OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]

    one = tmp_path / "one"
    retrieval = evaluate_retrieval(RetrievalEvalConfig(ckpt=str(tiny_run), data=str(odd_root / "synth7"),
                                                       num_workers=0, batch_size=3, out=str(one / "retrieval.json")))
    saved = json.loads((two / "retrieval.json").read_text())
    assert (saved["n_images"], saved["n_texts"]) == (N_IMAGES, 5 * N_IMAGES)
    assert saved["metrics"] == pytest.approx(retrieval.metrics, abs=1e-4)  # the JSON holds 4 decimals

    zeroshot = evaluate_zeroshot(ZeroShotConfig(ckpt=str(tiny_run), data=str(odd_root / "shapes"),
                                                out=str(one / "zeroshot.json"), batch_size=4, num_workers=0))
    assert zeroshot.details["n_images"] == N_CLASSES * 3 - 1
    assert ranks[0]["zeroshot"] == ranks[1]["zeroshot"]  # every rank returns rank 0's result
    assert ranks[0]["zeroshot_path"] == ranks[1]["zeroshot_path"] == str(two / "zeroshot.json")
    assert json.loads((two / "zeroshot.json").read_text()) == ranks[0]["zeroshot"]
    assert ranks[0]["zeroshot"]["metrics"] == pytest.approx(zeroshot.metrics, abs=1e-4)

    single = _validations(tiny_run, odd_root, one / "ft", DistInfo())
    for name, metrics in single.items():
        for rank in ranks:
            assert rank["validation"][name] == pytest.approx(metrics, rel=1e-5, abs=1e-6), name


if __name__ == "__main__":
    _worker(*(Path(a) for a in sys.argv[1:4]))
