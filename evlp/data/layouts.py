"""The on-disk layout of an evlp data root: what ``evlp data download`` writes and every reader expects.

```
ROOT/
  cc3m/  cc12m/     NNNNN.tar (+ NNNNN.parquet, NNNNN_stats.json): img2dataset webdataset shards
                    (KEY.jpg, KEY.txt, KEY.json); MANIFEST.json
  coco/             train/NNNNN.tar: Karpathy train+restval as shards (pretraining, retrieval fine-tuning)
                    karpathy.json + train2014/ val2014/: Karpathy index (val and test splits) and images
                    MANIFEST.json
  flickr30k/        train/NNNNN.tar, karpathy.json, flickr30k-images/, MANIFEST.json (same as coco)
  imagenet/         train/<wnid>/*.JPEG, val/<wnid>/*.JPEG (ImageFolder; class index = sorted wnids, the
                    standard ImageNet-1k order that evlp's zero-shot class names follow); MANIFEST.json
  glue/<task>/      <split>.jsonl, one example per line: {"idx": int, "text_a": str, "text_b": str | null,
                    "label": int | float | null}; label null on unlabelled test splits; float for stsb.
                    Splits: train, validation, test (mnli: validation_matched, validation_mismatched,
                    test_matched, test_mismatched). MANIFEST.json
```
"""

from __future__ import annotations

from dataclasses import dataclass

DATASETS = ("cc3m", "cc12m", "coco", "flickr30k", "imagenet", "glue")
"""Folder names under a data root (``flickr`` on the command line writes ``flickr30k``)."""

KARPATHY_INDEX = "karpathy.json"
TRAIN_SHARDS = "train"


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: label count (1 = regression), main metric, validation splits, and text fields."""

    name: str
    num_labels: int
    metric: str
    validation: tuple[str, ...] = ("validation",)
    pair: bool = True


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", 2, "mcc", pair=False),
    "sst2": GlueTask("sst2", 2, "accuracy", pair=False),
    "mrpc": GlueTask("mrpc", 2, "f1"),
    "qqp": GlueTask("qqp", 2, "f1"),
    "stsb": GlueTask("stsb", 1, "spearman"),
    "mnli": GlueTask("mnli", 3, "accuracy", ("validation_matched", "validation_mismatched")),
    "qnli": GlueTask("qnli", 2, "accuracy"),
    "rte": GlueTask("rte", 2, "accuracy"),
    "wnli": GlueTask("wnli", 2, "accuracy"),
}
"""The nine GLUE tasks. Labels follow the HF ``glue`` dataset's integer coding (e.g. MNLI: 0 entailment,
1 neutral, 2 contradiction; MRPC/QQP: 1 = paraphrase/duplicate; RTE/QNLI/WNLI: 0 = entailment)."""
