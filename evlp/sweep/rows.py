"""The rows of a sweep's results table: which result file of a run, which metric, the paper's figure.

Each training command fills rows of its own (a GLUE fine-tune one per validation split, a retrieval fine-tune its
test R@1, an image fine-tune or linear probe its top-1); evaluations fill one. The paper's figures are those of
reference.md section 8.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GLUE_LABELS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B", "mnli": "MNLI",
               "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}
GLUE_PAPER = {"cola": 14.2, "sst2": 83.5, "mrpc": 79.9, "qqp": 81.2, "stsb": 57.5, "mnli": 73.88, "qnli": 78.71,
              "rte": 51.6, "wnli": 45.0}
"""The paper's GLUE figures (reference.md section 8): accuracy and F1 in %, MCC and Spearman x 100; MNLI is the
matched dev set."""
RETRIEVAL_PAPER = {("zeroshot", "coco"): (53.54 + 35.65) / 2, ("zeroshot", "flickr30k"): (70.9 + 52.72) / 2,
                   ("finetune", "coco"): (56.2 + 39.8) / 2, ("finetune", "flickr30k"): (82.0 + 64.6) / 2}
"""Mean of TR@1 and IR@1 (the README's "R@1"), zero-shot and after retrieval fine-tuning."""
VISION_PAPER = {("zeroshot", "imagenet"): 37.1, ("linear", "imagenet"): 65.0, ("finetune", "imagenet"): 75.5,
                ("linear", "cifar10"): 89.7, ("finetune", "cifar10"): 97.6, ("linear", "cifar100"): 71.3,
                ("finetune", "cifar100"): 85.2}
"""Top-1 accuracy (%)."""
DATASET_LABELS = {"coco": "COCO 5k", "flickr30k": "Flickr30K 1k", "imagenet": "ImageNet-1k", "cifar10": "CIFAR-10",
                  "cifar100": "CIFAR-100"}


@dataclass
class Row:
    """One line of the results table filled by a run.

    ``metric`` is a key of the result's ``metrics`` or ``mean:a,b`` (the mean of several); ``scale`` turns it
    into the paper's unit (x100 for correlations). ``glue`` marks the rows that make up the GLUE average.
    """

    label: str
    result: str
    """The result JSON, relative to the run's folder."""
    metric: str
    metric_name: str
    paper: float | None = None
    scale: float = 1.0
    glue: bool = False
    details: list[str] = field(default_factory=list)
    """Other metrics of the same result to show beside the main one."""
    optional: bool = False
    """The run may end without this result (a pretraining run without a test set) and still be done."""

    def value(self, metrics: dict[str, Any]) -> float | None:
        """The row's value from a result's ``metrics`` (None when a key is missing)."""
        if self.metric.startswith("mean:"):
            parts = [metrics.get(k) for k in self.metric[5:].split(",")]
            if any(not isinstance(p, (int, float)) for p in parts):
                return None
            return sum(parts) / len(parts) * self.scale  # type: ignore[arg-type]
        v = metrics.get(self.metric)
        return float(v) * self.scale if isinstance(v, (int, float)) else None


# ---------------------------------------------------------------------- rows
def glue_rows(cfg: Any) -> list[Row]:
    """The rows of a GLUE fine-tune: each validation split of its task (MNLI: matched and mismatched)."""
    from evlp.checkpoint import EVAL_DIR
    from evlp.data.layouts import GLUE_TASKS

    task = cfg.task
    spec = GLUE_TASKS[task]
    scale = 100.0 if spec.metric in ("mcc", "spearman") else 1.0
    shown = {"mcc": "MCC x100", "spearman": "Spearman x100", "f1": "F1", "accuracy": "accuracy"}[spec.metric]
    rows = []
    for i, split in enumerate(spec.validation):
        label = GLUE_LABELS.get(task, task)
        if len(spec.validation) > 1:
            label += "-m" if "mismatched" not in split else "-mm"
        rows.append(Row(label=label, result=f"run/{EVAL_DIR}/glue_{task}_{split}.json", metric=spec.metric,
                        metric_name=shown, paper=GLUE_PAPER.get(task) if i == 0 else None, scale=scale,
                        glue=i == 0, details=["accuracy"] if spec.metric in ("f1", "mcc") else []))
    return rows


def retrieval_rows(cfg: Any) -> list[Row]:
    """The row of a retrieval fine-tune: test R@1 (mean of TR@1 and IR@1)."""
    from evlp.checkpoint import EVAL_DIR

    return [Row(label=f"{DATASET_LABELS.get(cfg.dataset, cfg.dataset)} fine-tuned",
                result=f"run/{EVAL_DIR}/retrieval_{cfg.dataset}_{cfg.test_split}.json", metric="mean:tr1,ir1",
                metric_name="R@1 (TR/IR mean)", paper=RETRIEVAL_PAPER.get(("finetune", cfg.dataset)),
                details=["tr1", "ir1", "rsum"])]


def imagenet_rows(cfg: Any) -> list[Row]:
    """The row of an image-classification fine-tune or linear probe: val top-1."""
    from evlp.checkpoint import EVAL_DIR

    mode = "linear" if cfg.linear else "finetune"
    name = "imagenet-linear" if cfg.linear else "imagenet"
    return [Row(label=f"{DATASET_LABELS.get(cfg.dataset, cfg.dataset)} {'linear probe' if cfg.linear else 'fine-tuned'}",
                result=f"run/{EVAL_DIR}/{name}_{cfg.dataset}_val.json", metric="top1", metric_name="top-1",
                paper=VISION_PAPER.get((mode, cfg.dataset)), details=["top5"])]


def pretrain_rows(cfg: Any) -> list[Row]:
    """The rows of a pretraining run: the retrieval score it evaluates itself with (when it has a test set) and its
    final training loss (``RUN/summary.json``)."""
    from evlp.checkpoint import EVAL_DIR

    return [Row(label="pretraining retrieval", result=f"run/{EVAL_DIR}/retrieval.json", metric="mean:tr1,ir1",
                metric_name="R@1 (TR/IR mean)", details=["tr1", "ir1"], optional=True),
            Row(label="pretraining loss", result="run/summary.json", metric="loss",
                metric_name="train loss (last window)", details=["itc_x_acc", "kd_acc"])]


ROWS_OF = {"glue": glue_rows, "retrieval": retrieval_rows, "imagenet": imagenet_rows, "pretrain": pretrain_rows}


def zeroshot_retrieval_row(dataset: str) -> Row:
    return Row(label=f"{DATASET_LABELS.get(dataset, dataset)} zero-shot", result="result.json",
               metric="mean:tr1,ir1", metric_name="R@1 (TR/IR mean)", paper=RETRIEVAL_PAPER.get(("zeroshot", dataset)),
               details=["tr1", "ir1", "rsum"])


def zeroshot_classification_row(dataset: str) -> Row:
    return Row(label=f"{DATASET_LABELS.get(dataset, dataset)} zero-shot", result="result.json", metric="top1",
               metric_name="top-1", paper=VISION_PAPER.get(("zeroshot", dataset)), details=["top5"])


def eval_row(command: list[str], argv: list[str]) -> Row:
    data = argv[argv.index("--data") + 1] if "--data" in argv[:-1] else ("coco" if command[-1] == "retrieval"
                                                                          else "imagenet")
    dataset = Path(data).name
    if command[-1] == "retrieval":
        return zeroshot_retrieval_row(dataset)
    return zeroshot_classification_row(dataset)


