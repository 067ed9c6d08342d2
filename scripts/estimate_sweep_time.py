"""Estimate how long each downstream task of ``evlp sweep`` takes on one GPU. An ESTIMATE, not a measurement.

Method (printed with the results):

1. FLOPs per sample. ``torch.utils.flop_counter.FlopCounterMode`` counts the matrix products (linear layers,
   attention, the patch convolution; not element-wise work) of each task's model at the paper's sizes, built
   by evlp's own builders with random init on the CPU (nothing is downloaded: the text tower is a random-init
   6-layer BERT-base). Attention runs on PyTorch's math SDPA backend while counting, because the fused CPU
   kernel is invisible to the counter. Models run at a batch of 2 (FLOPs scale linearly with the batch); the
   losses, whose cost grows with the batch (CLIP logits, the KD memory bank), are counted separately at the
   recipes' real batch. Training = forward + backward; evaluation = forward only.
2. Samples per task. Batch sizes come from the shipped recipes (``configs/``, via evlp's config loader).
   The recipes set epochs, not steps, so the steps come from the reference recipes (reference.md section 6)
   unless a recipe sets ``train.max_steps``; the ``from`` column says which. A second estimate uses the
   recipes' own epochs over the public split sizes (``est. h, recipe epochs``); it differs mostly for
   retrieval (evlp trains 5 epochs as the thesis did, the reference YAML 20). Evaluation passes: one
   validation per epoch (evlp's loop default) plus the final scoring of the kept checkpoint.
3. Effective GPU rate. The paper's S-SMKE pretraining ran at about 290 samples/s per RTX 4090 (2 GPUs,
   11.1 h, 7 epochs of 3.26M pairs). Effective FLOP/s = (pretraining FLOPs per sample from step 1) x 290;
   hours of a task = its FLOPs / that rate. This assumes every task reaches the pretraining run's efficiency
   (mixed precision, the same data pipeline overhead per FLOP); see the printed assumptions.

Prints a markdown table and, as the last line, one JSON object. Takes about a minute on two CPU cores.

    python scripts/estimate_sweep_time.py [--rate 290] [--count-batch 2]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from evlp.config import GlueConfig, ImageNetConfig, PretrainConfig, RetrievalFinetuneConfig, load_config
from evlp.config.recipes import RUNTIME_INPUTS
from evlp.config.schema import ModelConfig
from evlp.data.layouts import GLUE_TASKS
from evlp.eval.zeroshot import imagenet_templates
from evlp.losses import MemoryBank, clip_loss, kd_loss, total_loss
from evlp.models import build_model, build_teacher_of
from evlp.models.heads import GlueClassifier, ImageClassifier
from evlp.train.pretrain import PretrainModule
from evlp.train.retrieval import RetrievalModule

GIGA = 1e9

PAPER_SAMPLES_PER_S = 290.0
"""S-SMKE pretraining throughput per RTX 4090: 89,273 steps x 256 = 22.85M samples in 11.1 h on 2 GPUs."""

# Reference recipes (reference.md section 6): (max_steps, batch).
REFERENCE_STEPS: dict[str, tuple[int, int]] = {
    "cola": (10_689, 16), "sst2": (21_047, 32), "qnli": (32_733, 32), "rte": (3_113, 16), "mrpc": (5_095, 16),
    "qqp": (31_563, 128), "stsb": (7_187, 16), "mnli": (61_360, 64), "wnli": (1_588, 8),
    "imagenet": (75_060, 256), "linear": (75_060, 256), "coco": (11_080, 1024), "flickr30k": (2_840, 1024),
    "cifar": (3_525, 256),
}

# Public split sizes: training samples, and forward passes of one validation / test pass.
GLUE_TRAIN = {"cola": 8_551, "sst2": 67_349, "qnli": 104_743, "rte": 2_490, "mrpc": 3_668, "qqp": 363_846,
              "stsb": 5_749, "mnli": 392_702, "wnli": 635}
GLUE_VAL = {"cola": 1_043, "sst2": 872, "qnli": 5_463, "rte": 277, "mrpc": 408, "qqp": 40_430, "stsb": 1_500,
            "mnli": 9_815 + 9_832, "wnli": 71}
IMAGENET_TRAIN, IMAGENET_VAL, IMAGENET_CLASSES = 1_281_167, 50_000, 1000
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000
# Karpathy splits: training pairs; (images, captions) of val and test (COCO val captions: about 25k).
RETRIEVAL_TRAIN = {"coco": 566_747, "flickr30k": 145_000}
RETRIEVAL_VAL = {"coco": (5_000, 25_010), "flickr30k": (1_014, 5_070)}
RETRIEVAL_TEST = {"coco": (5_000, 25_010), "flickr30k": (1_000, 5_000)}
PRETRAIN_PAIRS, PRETRAIN_GPUS = 3_264_868, 2


# ---------------------------------------------------------------------- step 1: FLOPs per sample
def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of the matrix products ``fn`` runs (attention on the math backend, so that it is counted)."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel([SDPBackend.MATH]), counter:
        fn()
    return float(counter.get_total_flops())


def _surrogate_backward(outputs: dict[str, Tensor]) -> None:
    """Backpropagate through every output (the backward cost does not depend on the loss's value)."""
    sum(v.float().sum() for v in outputs.values() if v.requires_grad).backward()


@dataclass
class FlopTable:
    """GFLOP per sample of each kind of work (training = forward + backward; ``*_fwd`` = forward only)."""

    gflop: dict[str, float] = field(default_factory=dict)
    parts: dict[str, float] = field(default_factory=dict)
    """Breakdown of the pretraining step (student, teacher, losses)."""


def measure(model_cfg: ModelConfig, *, batch: int, caption_len: int, glue_len: int, pretrain_batch: int,
            bank_size: int, retrieval_batch: int, glue_labels: set[int]) -> FlopTable:
    """Count the FLOPs per sample of every workload of the table (see the module doc, step 1)."""
    torch.manual_seed(0)
    table = FlopTable()
    g = table.gflop
    student = build_model(model_cfg)  # random init, no downloads
    teacher = build_teacher_of(model_cfg)
    size = model_cfg.image.img_size
    pixels = torch.randn(batch, 3, size, size)
    ids = torch.randint(0, model_cfg.text.vocab_size, (batch, caption_len))
    mask = torch.ones_like(ids)

    # S-SMKE pretraining: student forward + backward, frozen teacher forward, losses at the real batch.
    module = PretrainModule(student, kd_temperature=0.07, learnable=False).train()
    table.parts["student"] = count_flops(lambda: _surrogate_backward(module(pixels, ids, mask))) / batch / GIGA
    table.parts["teacher"] = count_flops(lambda: teacher(pixels)) / batch / GIGA
    bank = MemoryBank(bank_size, model_cfg.target_dim)
    bank.push(F.normalize(torch.randn(bank_size, model_cfg.target_dim), dim=-1))  # full, as after warm-up
    b, d, dt = pretrain_batch, model_cfg.shared.width, model_cfg.target_dim
    d_interm = int(model_cfg.shared.mlp_ratio * d)  # x_interm: the shared block's fc1 output

    def pretrain_losses() -> None:
        kd_img, kd_txt = (torch.randn(b, dt, requires_grad=True) for _ in range(2))
        feats = [torch.randn(b, w, requires_grad=True) for w in (d_interm, d_interm, d, d)]
        scale = torch.tensor(1 / 0.07)
        kd = kd_loss(kd_img, kd_txt, torch.randn(b, dt), bank.negatives(), scale).loss
        itc = [clip_loss(feats[i], feats[i + 1], scale).loss for i in (0, 2)]
        total_loss(kd, itc).backward()

    table.parts["losses"] = count_flops(pretrain_losses) / b / GIGA
    g["pretrain"] = sum(table.parts.values())

    # Evaluation encoders (forward only): image tower + shared block, text tower + shared block. Forward-only
    # passes are counted with autograd on but no backward (same FLOPs): under no_grad, the counter's module
    # tracker trips over S-SMKE's token-type row (a view of a parameter that requires grad without a grad_fn).
    student.eval()
    g["image_fwd"] = count_flops(lambda: student.encode_image(pixels)) / batch / GIGA
    g["text_fwd"] = count_flops(lambda: student.encode_text(ids, mask)) / batch / GIGA

    # Retrieval fine-tuning: both towers + shared block, CLIP ITC on x at the recipe's batch.
    retrieval = RetrievalModule(student).train()
    model_part = count_flops(lambda: _surrogate_backward(retrieval(pixels, ids, mask))) / batch

    def retrieval_loss() -> None:
        x_img, x_txt = (torch.randn(retrieval_batch, d, requires_grad=True) for _ in range(2))
        clip_loss(x_img, x_txt, torch.tensor(1 / 0.07)).loss.backward()

    g["retrieval"] = (model_part + count_flops(retrieval_loss) / retrieval_batch) / GIGA

    # GLUE: text tower + pooler + classifier at max_length tokens, sentence pairs (token types).
    glue_ids = torch.randint(0, model_cfg.text.vocab_size, (batch, glue_len))
    glue_mask, types = torch.ones_like(glue_ids), (torch.arange(glue_len) >= glue_len // 2).long().expand(batch, -1)
    for labels in sorted(glue_labels):
        clf = GlueClassifier(student.text, labels, dropout=0.1).train()

        def glue_step(clf: GlueClassifier = clf, labels: int = labels) -> None:
            logits = clf(glue_ids, glue_mask, types).float()
            loss = F.mse_loss(logits[:, 0], torch.randn(batch)) if labels == 1 \
                else F.cross_entropy(logits, torch.randint(0, labels, (batch,)))
            loss.backward()

        g[f"glue{labels}"] = count_flops(glue_step) / batch / GIGA
    scorer = GlueClassifier(student.text, 2, dropout=0.1).eval()
    g["glue_fwd"] = count_flops(lambda: scorer(glue_ids, glue_mask, types)) / batch / GIGA

    # ImageNet: image tower + mean pool + LayerNorm + Linear(1000); soft-target CE (Mixup/CutMix).
    for name, frozen in (("imagenet", False), ("linear", True)):
        classifier = ImageClassifier(student.image, IMAGENET_CLASSES, pool="mean", frozen=frozen).train()

        def image_step(classifier: ImageClassifier = classifier) -> None:
            target = torch.softmax(torch.randn(batch, IMAGENET_CLASSES), dim=-1)
            (-(target * F.log_softmax(classifier(pixels), dim=-1)).sum(-1).mean()).backward()

        g[name] = count_flops(image_step) / batch / GIGA
    scorer_img = ImageClassifier(student.image, IMAGENET_CLASSES, pool="mean").eval()
    g["classify_fwd"] = count_flops(lambda: scorer_img(pixels)) / batch / GIGA
    return table


# ---------------------------------------------------------------------- step 2: samples per task
@dataclass
class Row:
    """One task of the table: training samples (forward + backward) and forward-only passes."""

    task: str
    family: str
    train_kind: str | None
    train_samples: int
    evals: dict[str, int]
    source: str
    recipe_train_samples: int | None = None
    recipe_evals: dict[str, int] | None = None

    def flops(self, g: dict[str, float], recipe: bool = False) -> float:
        """Total GFLOP of the row (the recipe-epochs variant with ``recipe``)."""
        samples = self.recipe_train_samples if recipe and self.recipe_train_samples is not None \
            else self.train_samples
        evals = self.recipe_evals if recipe and self.recipe_evals is not None else self.evals
        train = samples * g[self.train_kind] if self.train_kind else 0.0
        return train + sum(n * g[kind] for kind, n in evals.items())


def _steps(cfg: Any, key: str) -> tuple[int, int, str]:
    """``(steps, batch, where from)``: recipe max_steps when set, else the reference's; batch from the recipe."""
    ref_steps, ref_batch = REFERENCE_STEPS[key]
    batch = int(cfg.train.batch_size)
    note = "" if batch == ref_batch else f" (reference batch {ref_batch})"
    if cfg.train.max_steps:
        return int(cfg.train.max_steps), batch, f"steps+batch: recipe{note}"
    return ref_steps, batch, f"batch: recipe, steps: ref. §6 (recipe: {cfg.train.epochs} ep){note}"


def _validations(steps: int, batch: int, train_size: int) -> int:
    """Validations during training: one per epoch (evlp's default ``eval_every``)."""
    return max(1, round(steps / max(1, train_size // batch)))


def _recipe(cfg: Any, train_size: int) -> tuple[int, int]:
    """``(training samples, validations)`` of the recipe's own epochs (floor of split / batch steps per epoch)."""
    batch = int(cfg.train.batch_size)
    steps = cfg.train.max_steps or cfg.train.epochs * (train_size // batch)
    return int(steps) * batch, _validations(int(steps), batch, train_size)


def _finetune(task: str, family: str, kind: str, cfg: Any, key: str, train_size: int,
              val: dict[str, int], final: dict[str, int]) -> Row:
    """A fine-tuning row: training, a validation pass per epoch, and the final scoring pass ``final``."""
    steps, batch, source = _steps(cfg, key)
    n_val = _validations(steps, batch, train_size)
    samples, n_val_recipe = _recipe(cfg, train_size)

    def evals(n: int) -> dict[str, int]:
        return {k: n * val.get(k, 0) + final.get(k, 0) for k in {**val, **final}}

    return Row(task, family, kind, steps * batch, evals(n_val), source, samples, evals(n_val_recipe))


def plan(model_cfg: ModelConfig, retrieval_cfgs: dict[str, Any], glue_cfgs: dict[str, Any],
         imagenet_cfgs: dict[str, Any]) -> list[Row]:
    """Every task of the three sweep families (and CIFAR) with its samples and forward passes."""
    rows: list[Row] = []
    for task, cfg in glue_cfgs.items():
        labels = GLUE_TASKS[task].num_labels
        rows.append(_finetune(f"glue/{task}", "glue", f"glue{labels}", cfg, task, GLUE_TRAIN[task],
                              {"glue_fwd": GLUE_VAL[task]}, {"glue_fwd": GLUE_VAL[task]}))
    for name, cfg in retrieval_cfgs.items():
        test_img, test_txt = RETRIEVAL_TEST[name]
        test = {"image_fwd": test_img, "text_fwd": test_txt}
        val_img, val_txt = RETRIEVAL_VAL[name]
        rows.append(Row(f"retrieval/{name} zero-shot (test)", "retrieval", None, 0, test, "Karpathy test"))
        rows.append(_finetune(f"retrieval/{name} fine-tune", "retrieval", "retrieval", cfg, name,
                              RETRIEVAL_TRAIN[name], {"image_fwd": val_img, "text_fwd": val_txt}, {}))
        rows.append(Row(f"retrieval/{name} fine-tuned (test)", "retrieval", None, 0, test, "Karpathy test"))
    prompts = IMAGENET_CLASSES * len(imagenet_templates())
    rows.append(Row("imagenet zero-shot", "vision", None, 0, {"image_fwd": IMAGENET_VAL, "text_fwd": prompts},
                    f"50k val + {prompts:,} prompts"))
    val = {"classify_fwd": IMAGENET_VAL}
    rows.append(_finetune("imagenet linear probe", "vision", "linear", imagenet_cfgs["linear"], "linear",
                          IMAGENET_TRAIN, val, val))
    rows.append(_finetune("imagenet fine-tune", "vision", "imagenet", imagenet_cfgs["imagenet"], "imagenet",
                          IMAGENET_TRAIN, val, val))
    # CIFAR-10/100 (no shipped recipe): the reference's 3,525 steps x 256 at 224 px, 10k test images per pass.
    steps, batch = REFERENCE_STEPS["cifar"]
    n_val = _validations(steps, batch, CIFAR_TRAIN)
    for data in ("cifar10", "cifar100"):
        for mode, kind in (("linear probe", "linear"), ("fine-tune", "imagenet")):
            rows.append(Row(f"{data} {mode}", "cifar", kind, steps * batch,
                            {"classify_fwd": (n_val + 1) * CIFAR_TEST}, "ref. §6.1 (no recipe)"))
    return rows


# ---------------------------------------------------------------------- step 3: rate, hours, output
FAMILIES = {"glue": ("glue",), "retrieval": ("retrieval",), "vision": ("vision",), "cifar": ("cifar",),
            "all": ("glue", "retrieval", "vision"), "all+cifar": ("glue", "retrieval", "vision", "cifar")}


def _evals_text(evals: dict[str, int]) -> str:
    names = {"image_fwd": "img", "text_fwd": "txt", "glue_fwd": "seq", "classify_fwd": "img"}
    return " + ".join(f"{n:,} {names[k]}" for k, n in evals.items() if n) or "-"


def _gflop_text(row: Row, g: dict[str, float]) -> str:
    parts = [f"{g[row.train_kind]:.1f} train"] if row.train_kind else []
    parts += [f"{g[k]:.1f} {'txt' if k in ('text_fwd', 'glue_fwd') else 'img'} fwd" for k, n in row.evals.items() if n]
    return " / ".join(parts)


def render(rows: list[Row], table: FlopTable, rate: float, pretrain_samples: int) -> tuple[str, dict[str, Any]]:
    """The markdown report and the JSON summary."""
    g = table.gflop
    flops_per_s = g["pretrain"] * GIGA * rate

    def hours(gflop: float) -> float:
        return gflop * GIGA / flops_per_s / 3600

    lines = [
        "# evlp sweep: ESTIMATED time per task on one RTX 4090 (FLOP-count estimate, not a measurement)",
        "",
        (f"Effective rate: S-SMKE pretraining = {g['pretrain']:.1f} GFLOP/sample (student fwd+bwd "
         f"{table.parts['student']:.1f} + frozen teacher fwd {table.parts['teacher']:.1f} + losses "
         f"{table.parts['losses']:.2f}) x {rate:g} samples/s (paper: 2x RTX 4090, 11.1 h) = "
         f"{flops_per_s / 1e12:.1f} TFLOP/s counted-matmul throughput."),
        "",
        ("| task | family | train samples | eval fwd passes | GFLOP/sample | est. h | steps x batch from "
         "| est. h, recipe epochs |"),
        "|---|---|---:|---|---|---:|---|---:|",
        (f"| S-SMKE pretraining (calibration) | - | {pretrain_samples:,} | - | {g['pretrain']:.1f} train | "
         f"{hours(pretrain_samples * g['pretrain']):.1f} | 7 ep x 3,264,868 pairs | - |"),
    ]
    out_rows = []
    for row in rows:
        h, h_recipe = hours(row.flops(g)), hours(row.flops(g, recipe=True))
        recipe_cell = f"{h_recipe:.2f}" if row.recipe_train_samples is not None else "="
        lines.append(f"| {row.task} | {row.family} | {row.train_samples:,} | {_evals_text(row.evals)} | "
                     f"{_gflop_text(row, g)} | {h:.2f} | {row.source} | {recipe_cell} |")
        out_rows.append({"task": row.task, "family": row.family, "train_samples": row.train_samples,
                         "train_gflop_per_sample": round(g[row.train_kind], 3) if row.train_kind else None,
                         "eval_passes": {k: v for k, v in row.evals.items() if v},
                         "total_pflop": round(row.flops(g) / 1e6, 2), "est_hours": round(h, 3),
                         "source": row.source, "est_hours_recipe_epochs": round(h_recipe, 3)})
    sums, sums_recipe = {}, {}
    for fam, members in FAMILIES.items():
        sums[fam] = sum(hours(r.flops(g)) for r in rows if r.family in members)
        sums_recipe[fam] = sum(hours(r.flops(g, recipe=True)) for r in rows if r.family in members)
    lines += ["", "| sweep family | est. h (steps from reference) | est. h (recipe epochs) |", "|---|---:|---:|"]
    lines += [f"| {fam} | {sums[fam]:.1f} | {sums_recipe[fam]:.1f} |" for fam in FAMILIES]
    lines += ["", ("Families: glue = nine tasks; retrieval = zero-shot test, fine-tune (with per-epoch validation), "
                   "fine-tuned test, for COCO and Flickr30K; vision = ImageNet zero-shot, linear probe, fine-tune; "
                   "cifar = CIFAR-10/100 linear probe + fine-tune (optional); all = glue + retrieval + vision. "
                   "'=' in the last column: no recipe epochs to differ from.")]
    summary = {
        "estimate": True,
        "method": "FlopCounterMode matmul FLOPs (CPU, random init, math SDPA) x samples / "
                  "(pretrain FLOPs per sample x paper samples/s per RTX 4090)",
        "rate": {"samples_per_s": rate, "pretrain_gflop_per_sample": round(g["pretrain"], 3),
                 "pretrain_parts_gflop": {k: round(v, 3) for k, v in table.parts.items()},
                 "effective_tflops": round(flops_per_s / 1e12, 2)},
        "gflop_per_sample": {k: round(v, 3) for k, v in g.items()},
        "tasks": out_rows,
        "families_hours": {k: round(v, 2) for k, v in sums.items()},
        "families_hours_recipe_epochs": {k: round(v, 2) for k, v in sums_recipe.items()},
    }
    return "\n".join(lines), summary


ASSUMPTIONS = """Assumptions (estimate):
- Every task runs at the pretraining run's FLOP efficiency; small batches (WNLI 8, CoLA/RTE/MRPC/STS-B 16) and
  forward-only passes limited by JPEG decoding will be slower than this, fused attention kernels faster.
- GLUE counted at the full max_length (256 tokens, the reference pads to it); evlp pads per batch to the longest
  example, so real GLUE cost is lower (an upper bound here).
- Captions and zero-shot prompts at the caption length evlp pads to (model.text.max_length); ImageNet at 224 px.
- Only matrix products are counted (linear, attention, patch convolution); element-wise work, optimizer steps,
  the similarity matrices of retrieval/zero-shot scoring and the data pipeline are not.
- CLIP losses counted on one device (2-GPU gathers would double their small logit matrices)."""


def main() -> None:
    """Measure, plan, print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=PAPER_SAMPLES_PER_S,
                        help="pretraining samples/s per GPU that calibrates the FLOP rate (default: %(default)s)")
    parser.add_argument("--count-batch", type=int, default=2, help="batch the models are counted at")
    args = parser.parse_args()
    start = time.perf_counter()

    ckpt = dict(RUNTIME_INPUTS)
    pretrain_cfg = load_config(PretrainConfig, "s_smke", command="pretrain")
    glue_cfgs = {t: load_config(GlueConfig, t, command="glue", extra=ckpt) for t in GLUE_TRAIN}
    retrieval_cfgs = {d: load_config(RetrievalFinetuneConfig, d, command="retrieval", extra=ckpt)
                      for d in RETRIEVAL_TRAIN}
    imagenet_cfgs = {n: load_config(ImageNetConfig, n, command="imagenet", extra=ckpt) for n in ("imagenet", "linear")}
    model_cfg = pretrain_cfg.model
    glue_lens = {c.max_length for c in glue_cfgs.values()}
    sizes = {c.img_size for c in imagenet_cfgs.values()} - {None}
    if len(glue_lens) != 1 or sizes - {model_cfg.image.img_size}:
        raise SystemExit(f"recipes differ in GLUE max_length {glue_lens} or ImageNet img_size {sizes}; "
                         "this script counts one of each")
    retrieval_batches = {c.train.batch_size for c in retrieval_cfgs.values()}

    table = measure(model_cfg, batch=args.count_batch, caption_len=model_cfg.text.max_length,
                    glue_len=glue_lens.pop(), pretrain_batch=pretrain_cfg.train.batch_size,
                    bank_size=pretrain_cfg.loss.memory_bank_size, retrieval_batch=max(retrieval_batches),
                    glue_labels={GLUE_TASKS[t].num_labels for t in glue_cfgs})
    rows = plan(model_cfg, retrieval_cfgs, glue_cfgs, imagenet_cfgs)
    global_batch = pretrain_cfg.train.batch_size * PRETRAIN_GPUS
    pretrain_samples = pretrain_cfg.train.epochs * (PRETRAIN_PAIRS // global_batch) * global_batch
    report, summary = render(rows, table, args.rate, pretrain_samples)
    summary["runtime_s"] = round(time.perf_counter() - start, 1)
    print(report)
    print()
    print(ASSUMPTIONS)
    print(f"\n(runtime {summary['runtime_s']} s on {torch.get_num_threads()} CPU threads)")
    print(json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
    main()
