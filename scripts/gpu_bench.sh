#!/usr/bin/env bash
# The GPU figures of the README in one command, on a CUDA machine with evlp installed:
#   evlp bench train --config s_smke at batch 256 in bf16, without and with train.compile,
#   evlp bench data on a synthetic shard set (256 px JPEGs, as `evlp data download` writes them), with the
#   augmentation finished on the GPU (the default there) and all in the workers,
# then one JSON line with all of it (and the card's name). Random weights: nothing is downloaded.
#
#   bash scripts/gpu_bench.sh [BATCH] [STEPS]        (defaults 256 and 20)
set -euo pipefail
BATCH="${1:-256}"
STEPS="${2:-20}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=disabled
python - <<'PY' || { echo "no CUDA device: this script measures the GPU figures" >&2; exit 2; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
PY
evlp bench train --config s_smke --batch-size "$BATCH" --steps "$STEPS" --warmup 3 --device cuda \
  --json "$OUT/train.json" train.precision=bf16 data.num_workers=8 >&2
evlp bench train --config s_smke --batch-size "$BATCH" --steps "$STEPS" --warmup 5 --device cuda \
  --json "$OUT/train_compile.json" train.precision=bf16 train.compile=true data.num_workers=8 >&2
evlp data synth --out "$OUT/data" --train 4096 --test 8 --image-size 256 >&2
evlp bench data --data "$OUT/data/train" --workers 8 --images 16384 --json "$OUT/data.json" >&2   # augmentation on the GPU
evlp bench data --data "$OUT/data/train" --workers 8 --images 16384 --json "$OUT/data_workers.json" data.augment_on=workers >&2
python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
record = {name: json.loads((out / f"{name}.json").read_text()) for name in ("train", "train_compile", "data", "data_workers")}
for r in record.values():
    for key in [k for k in r if k.endswith("_all")]:  # the per-step lists
        r.pop(key)
print(json.dumps(record))
PY
