"""A sparse mixture-of-experts FFN with top-k gating, expert capacity and a modality-aware router (EVE).

GShard's recipe, as the released EVE code uses it (a DeepSpeed/fairscale top-2 gate):

- **Gate.** ``softmax(router(x))`` over the experts, in float32 whatever the autocast. The first expert of a
  token is its most probable one; the second is drawn Gumbel-max from the router's logits (the first excluded)
  while training, the next most probable in evaluation. A token's output is the gate-weighted sum of its experts'
  outputs, the weights renormalised over the experts that took it (top-1 keeps the raw gate, so that the router
  still gets a gradient).
- **Capacity.** Each expert takes at most ``C = max(min_capacity, ceil(capacity_factor * tokens * top_k /
  experts))`` tokens per forward pass. Slots are filled by priority: every token's first choice, in token order,
  before any second choice. An assignment past ``C`` is dropped: that expert contributes nothing (the residual
  connection around the FFN still carries the token). Padding tokens are never dispatched, so they take no slot
  (the released code routes them; ``tokens`` in the formula still counts every position, a static shape).
- **Load-balancing loss.** Switch/GShard's ``E * sum_e mean_gate_e * share_e``, ``share_e`` the fraction of
  tokens whose *first* choice is expert ``e`` (before dropping). It is 1 when either factor is uniform and ``E``
  when one expert takes everything.
- **Modality-aware routing.** A learned image or text type vector is added to each token's *router input*
  (EVE's "modality routing"), so experts can specialise by modality without being hard-wired to one. The
  released code also feeds the shifted token to the experts; ``type_to_experts`` does that too.

Dispatch is by index (each kept assignment copied into its expert's slot of an ``(E, C, D)`` buffer, the outputs
gathered back), exactly what GShard's dense one-hot einsums compute, without their ``tokens x E x C`` masks. The
experts then run as one batched matrix product over the buffer: the FLOPs of ``E x C`` slots, whether filled or
not, as on an accelerator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TEXT, IMAGE = 0, 1
"""Modality indices of :class:`SparseMoE`'s ``modality`` argument (as S-SMKE's token types)."""


@dataclass
class Routing:
    """Where each token's ``k`` assignments go. Shapes: S tokens, k choices, E experts.

    Attributes:
        experts: (S, k) the chosen experts, first choice first.
        slots: (S, k) each assignment's position in its expert's buffer (may be >= capacity: dropped).
        kept: (S, k) assignments that got a slot (False also for tokens that were not routed at all).
        weights: (S, k) combine weights (0 where not kept).
        aux_loss: () the load-balancing loss over the routed tokens.
        load: (E,) each expert's share of the routed assignments, before dropping (sums to 1).
        dropped: () the fraction of routed assignments dropped for lack of capacity.
        capacity: slots per expert.
    """

    experts: Tensor
    slots: Tensor
    kept: Tensor
    weights: Tensor
    aux_loss: Tensor
    load: Tensor
    dropped: Tensor
    capacity: int


def expert_capacity(tokens: int, experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """Slots per expert: ``max(min_capacity, ceil(capacity_factor * tokens * top_k / experts))``."""
    return max(int(min_capacity), math.ceil(capacity_factor * tokens * top_k / experts))


def load_balancing_loss(gates: Tensor, first: Tensor, routed: Tensor) -> Tensor:
    """``E * sum_e mean_gate_e * share_e`` over the routed tokens.

    Args:
        gates: (S, E) router probabilities.
        first: (S,) each token's first-choice expert.
        routed: (S,) bool, the tokens that count.
    """
    e = gates.shape[1]
    w = routed.float()[:, None]  # (S, 1)
    n = w.sum().clamp_min(1.0)
    mean_gate = (gates * w).sum(0) / n  # (E,)
    share = (F.one_hot(first, e).float() * w).sum(0) / n  # (E,)
    return e * (mean_gate * share).sum()


def route_top_k(logits: Tensor, top_k: int, capacity: int | None, routed: Tensor | None = None,
                noisy: bool = False) -> Routing:
    """GShard top-k routing of S tokens over E experts (see the module docstring).

    Args:
        logits: (S, E) router logits.
        top_k: experts per token (1 or 2 in GShard/Switch; any k <= E works).
        capacity: slots per expert; None: as many as the busiest expert needs (nothing dropped).
        routed: (S,) bool, tokens to route (padding excluded); default all.
        noisy: draw the choices after the first Gumbel-max from the logits (global RNG), as in training.
    """
    s, e = logits.shape
    logits = logits.float()
    gates = logits.softmax(-1)  # (S, E)
    routed = torch.ones(s, dtype=torch.bool, device=logits.device) if routed is None else routed.bool()
    later = logits
    if noisy and top_k > 1:  # Gumbel-max: a sample from softmax(logits) over the experts not taken yet
        later = logits - torch.empty_like(logits).exponential_().log()
    taken = torch.zeros_like(gates, dtype=torch.bool)
    choices = []
    for j in range(top_k):
        pick = (logits if j == 0 else later).masked_fill(taken, float("-inf")).argmax(-1)  # (S,)
        taken |= F.one_hot(pick, e).bool()
        choices.append(pick)
    experts = torch.stack(choices, 1)  # (S, k)
    onehot = F.one_hot(experts, e) * routed[:, None, None]  # (S, k, E), unrouted tokens take no slot
    # priority: all first choices in token order, then all second choices ...
    position = onehot.transpose(0, 1).reshape(top_k * s, e).cumsum(0).reshape(top_k, s, e).transpose(0, 1) - 1
    slots = (position * onehot).sum(-1)  # (S, k)
    load = onehot.sum((0, 1)).float()  # (E,) assignments per expert
    if capacity is None:
        capacity = max(1, int(load.max().item()))
    kept = routed[:, None] & (slots < capacity)  # (S, k)
    gate = gates.gather(1, experts) * kept  # (S, k)
    weights = gate / gate.sum(-1, keepdim=True).clamp_min(torch.finfo(gate.dtype).eps) if top_k > 1 else gate
    assigned = routed.sum() * top_k
    dropped = 1.0 - kept.sum() / assigned.clamp_min(1)
    return Routing(experts=experts, slots=slots, kept=kept, weights=weights,
                   aux_loss=load_balancing_loss(gates, experts[:, 0], routed),
                   load=load / load.sum().clamp_min(1.0), dropped=dropped.float(), capacity=capacity)


def trunc_normal(p: Tensor, std: float = 0.02) -> Tensor:
    """``p`` drawn from a normal of ``std`` truncated at one ``std`` (the released EVE code's initialisation)."""
    return nn.init.trunc_normal_(p, std=std, a=-std, b=std)


class StackedLinear(nn.Module):
    """E independent linear maps ``(E, C, in) -> (E, C, out)`` as one batched product. ``weight`` is (E, out, in):
    expert ``e``'s ``nn.Linear`` weight is ``weight[e]`` (the layout converters rely on).

    Computed as ``(W @ x^T)^T``: the weight's gradient then comes out in the weight's own layout, where ``x @ W^T``
    leaves a transposed gradient that costs a copy of every expert's weights (half the layer's backward on a CPU).
    """

    def __init__(self, experts: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(experts, out_features))
        trunc_normal(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        return torch.baddbmm(b[:, :, None], w, x.transpose(1, 2)).transpose(1, 2)  # (E, C, out)


class ExpertMLPs(nn.Module):
    """E two-layer MLPs (fc1, activation, fc2) over an ``(E, C, D)`` buffer."""

    def __init__(self, experts: int, dim: int, hidden: int, act_layer: type[nn.Module]) -> None:
        super().__init__()
        self.fc1 = StackedLinear(experts, dim, hidden)
        self.act = act_layer()
        self.fc2 = StackedLinear(experts, hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


@dataclass
class MoEOutput:
    """What a :class:`SparseMoE` forward returns: ``out`` (B, T, D) and its :class:`Routing`."""

    out: Tensor
    routing: Routing


class SparseMoE(nn.Module):
    """The sparse MoE FFN (module docstring).

    Args:
        dim: token width.
        hidden: each expert's hidden width.
        num_experts: E.
        top_k: experts per token.
        capacity_factor: training capacity factor.
        eval_capacity_factor: evaluation capacity factor; None: nothing is dropped in evaluation (each token's
            output then never depends on the other tokens of the batch).
        min_capacity: the least slots per expert.
        type_vector: add the learned image/text vector to the router input.
        type_to_experts: add it to the experts' input too (the released EVE code).
        noisy_second: Gumbel-max draw of the choices after the first while training (the released gate).
        act_layer: the experts' activation.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int = 2, capacity_factor: float = 1.0,
                 eval_capacity_factor: float | None = None, min_capacity: int = 4, type_vector: bool = True,
                 type_to_experts: bool = False, noisy_second: bool = True,
                 act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.min_capacity, self.noisy_second, self.type_to_experts = min_capacity, noisy_second, type_to_experts
        self.router = nn.Linear(dim, num_experts, bias=False)
        trunc_normal(self.router.weight)
        if type_vector:
            self.image_type = nn.Parameter(torch.empty(dim))
            self.text_type = nn.Parameter(torch.empty(dim))
            for p in (self.image_type, self.text_type):
                trunc_normal(p)
        else:
            self.image_type = self.text_type = None
        self.experts = ExpertMLPs(num_experts, dim, hidden, act_layer)

    def capacity(self, tokens: int) -> int | None:
        """Slots per expert for a forward pass over ``tokens`` positions (None: unlimited, in evaluation)."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None:
            return None
        return expert_capacity(tokens, self.num_experts, self.top_k, factor, self.min_capacity)

    def type_vectors(self, modality: Tensor) -> Tensor | None:
        """(..., D) each position's type vector for ``modality`` (..., IMAGE or TEXT); None without them."""
        if self.image_type is None:
            return None
        return torch.where((modality == IMAGE)[..., None], self.image_type, self.text_type)

    def forward(self, x: Tensor, modality: Tensor, routed: Tensor | None = None) -> MoEOutput:
        """``x`` (B, T, D); ``modality`` (T,) or (B, T) IMAGE/TEXT per position; ``routed`` (B, T) bool, False for
        padding (not dispatched, output 0)."""
        b, t, d = x.shape
        types = self.type_vectors(modality)
        shifted = x + types.to(x.dtype) if types is not None else x
        flat = shifted.reshape(b * t, d)  # (S, D)
        with torch.autocast(x.device.type, enabled=False):  # the gate in float32, as GShard's
            logits = F.linear(flat.float(), self.router.weight.float())  # (S, E)
        routing = route_top_k(logits, self.top_k, self.capacity(b * t),
                              routed.reshape(-1) if routed is not None else None,
                              noisy=self.noisy_second and self.training)
        source = flat if self.type_to_experts else x.reshape(b * t, d)
        return MoEOutput(self._dispatch(source, routing).view(b, t, d), routing)

    def _dispatch(self, tokens: Tensor, routing: Routing) -> Tensor:
        """Copy each kept assignment into its expert's slot, run the experts, gather and weight the outputs."""
        s, d = tokens.shape
        e, c, k = self.num_experts, routing.capacity, self.top_k
        trash = e * c  # one spare row receives every dropped assignment; its output is never used
        index = torch.where(routing.kept, routing.experts * c + routing.slots, trash)  # (S, k)
        source = tokens[:, None, :].expand(s, k, d).reshape(s * k, d)
        buffer = tokens.new_zeros(e * c + 1, d).index_add(0, index.reshape(-1), source)  # (E*C+1, D)
        out = self.experts(buffer[:trash].view(e, c, d)).reshape(e * c, d)  # (E*C, D)
        out = torch.cat([out, out.new_zeros(1, d)])  # the trash row's output: 0
        picked = out[index.reshape(-1)].view(s, k, d)  # (S, k, D)
        return (picked * routing.weights.to(picked.dtype)[..., None]).sum(1)  # (S, D)
