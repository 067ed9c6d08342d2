"""The sparse MoE FFN: routing, capacity dropping and outputs against a per-token loop; the balancing loss; the
modality-aware router; FLOP counting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from evlp.models.moe import IMAGE, TEXT, SparseMoE, route_top_k


def _loop_routing(logits: torch.Tensor, k: int, capacity: int, routed: torch.Tensor):
    """GShard's priority routing one assignment at a time: first choices in token order, then second choices."""
    s, e = logits.shape
    gates = logits.softmax(-1)
    choices = []
    for i in range(s):
        order = sorted(range(e), key=lambda j: -float(logits[i, j]))
        choices.append(order[:k])
    count = [0] * e
    kept = [[False] * k for _ in range(s)]
    for j in range(k):
        for i in range(s):
            if not routed[i]:
                continue
            ex = choices[i][j]
            kept[i][j] = count[ex] < capacity
            count[ex] += 1
    weights = []
    for i in range(s):
        g = [float(gates[i, choices[i][j]]) if kept[i][j] else 0.0 for j in range(k)]
        total = sum(g)
        weights.append([x / total if total > 0 else 0.0 for x in g])
    assigned = k * int(routed.sum())
    return choices, kept, weights, count, assigned


def _expert(moe: SparseMoE, ex: int, x: torch.Tensor) -> torch.Tensor:
    fc1, fc2 = moe.experts.fc1, moe.experts.fc2
    h = moe.experts.act(F.linear(x, fc1.weight[ex], fc1.bias[ex]))  # weight[e]: expert e's nn.Linear weight
    return F.linear(h, fc2.weight[ex], fc2.bias[ex])


def test_routing_capacity_and_output_match_a_per_token_loop() -> None:
    torch.manual_seed(0)
    b, t, d, e, k = 3, 13, 8, 4, 2
    moe = SparseMoE(d, 16, num_experts=e, top_k=k, capacity_factor=0.5, min_capacity=2, type_vector=False,
                    noisy_second=False).train()
    with torch.no_grad():
        moe.router.weight.normal_(std=1.0)  # decisive routing: some experts overflow
    x = torch.randn(b, t, d)
    routed = torch.rand(b, t) > 0.2
    capacity = max(2, math.ceil(0.5 * b * t * k / e))  # the formula, computed here
    assert moe.capacity(b * t) == capacity

    res = moe(x, torch.full((t,), TEXT), routed)
    logits = (x.reshape(-1, d) @ moe.router.weight.T).detach()
    choices, kept, weights, count, assigned = _loop_routing(logits, k, capacity, routed.reshape(-1))
    r = res.routing
    flat_routed = routed.reshape(-1)
    assert r.experts[flat_routed].tolist() == [c for c, m in zip(choices, flat_routed) if m]
    assert r.kept.tolist() == kept
    assert torch.allclose(r.weights, torch.tensor(weights), atol=1e-6)
    assert 0 < sum(not kk for row, m in zip(kept, flat_routed) if m for kk in row)  # some were dropped
    assert math.isclose(float(r.dropped), 1 - sum(map(sum, kept)) / assigned, rel_tol=1e-6)
    assert torch.allclose(r.load, torch.tensor(count, dtype=torch.float) / assigned)

    expected = torch.zeros(b * t, d)
    for i, xi in enumerate(x.reshape(-1, d)):
        for j in range(k):
            if kept[i][j]:
                expected[i] += weights[i][j] * _expert(moe, choices[i][j], xi)
    assert torch.allclose(res.out.reshape(-1, d), expected, atol=1e-5)
    assert (res.out.reshape(-1, d)[~flat_routed] == 0).all()  # padding: never dispatched


def test_evaluation_drops_nothing_and_top1_keeps_the_raw_gate() -> None:
    torch.manual_seed(1)
    moe = SparseMoE(8, 16, num_experts=4, top_k=2, capacity_factor=0.25, min_capacity=1, type_vector=False).eval()
    with torch.no_grad():
        moe.router.weight.normal_(std=2.0)
    res = moe(torch.randn(2, 20, 8), torch.full((20,), TEXT))
    assert bool(res.routing.kept.all()) and float(res.routing.dropped) == 0.0
    logits = torch.randn(10, 4)
    r = route_top_k(logits, 1, capacity=None)
    assert torch.allclose(r.weights[:, 0], logits.softmax(-1).max(-1).values)


def test_noisy_second_choice_comes_from_the_global_generator() -> None:
    logits = torch.randn(200, 6)
    torch.manual_seed(3)
    a = route_top_k(logits, 2, None, noisy=True).experts
    torch.manual_seed(3)
    b = route_top_k(logits, 2, None, noisy=True).experts
    assert torch.equal(a, b) and torch.equal(a[:, 0], logits.argmax(-1))
    assert (a[:, 1] != a[:, 0]).all()
    assert not torch.equal(a[:, 1], route_top_k(logits, 2, None).experts[:, 1])  # sampled, not the runner-up


def _balance_loop(logits: torch.Tensor) -> float:
    s, e = logits.shape
    gates = logits.softmax(-1)
    first = logits.argmax(-1)
    return e * sum(float(gates[:, j].mean()) * sum(int(f == j) for f in first) / s for j in range(e))


@pytest.mark.parametrize("e", [4, 8])
def test_load_balancing_loss_range(e: int) -> None:
    s = 64
    uniform = route_top_k(torch.zeros(s, e), 2, None).aux_loss
    assert math.isclose(float(uniform), 1.0, rel_tol=1e-6)  # the minimum: uniform gates
    balanced = torch.full((s, e), -30.0)
    balanced[torch.arange(s), torch.arange(s) % e] = 30.0  # each expert first for s/e tokens
    assert math.isclose(float(route_top_k(balanced, 2, None).aux_loss), 1.0, rel_tol=1e-5)
    collapsed = torch.full((s, e), -30.0)
    collapsed[:, 0] = 30.0
    assert math.isclose(float(route_top_k(collapsed, 2, None).aux_loss), e, rel_tol=1e-5)  # the maximum: E
    torch.manual_seed(e)
    for scale in (0.5, 3.0):
        logits = torch.randn(s, e) * scale
        aux = float(route_top_k(logits, 2, None).aux_loss)
        assert math.isclose(aux, _balance_loop(logits), rel_tol=1e-5) and 0 < aux <= e


def test_router_type_vector_biases_routing_but_not_the_expert_input() -> None:
    torch.manual_seed(2)
    d, e = 8, 4
    moe = SparseMoE(d, 16, num_experts=e, top_k=2, min_capacity=64, noisy_second=False).train()
    with torch.no_grad():  # the image vector pulls towards expert 0, the text vector towards expert 3
        moe.image_type.copy_(5 * moe.router.weight[0] / moe.router.weight[0].norm() ** 2)
        moe.text_type.copy_(5 * moe.router.weight[3] / moe.router.weight[3].norm() ** 2)
    x = 0.1 * torch.randn(1, 16, d)
    modality = torch.tensor([IMAGE] * 8 + [TEXT] * 8)
    seen = []
    moe.experts.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    res = moe(x, modality)
    first = res.routing.experts[:, 0]
    assert (first[:8] == 0).all() and (first[8:] == 3).all()  # the same kind of tokens, split by modality
    buffer = seen[0].reshape(-1, d)
    rows = buffer[buffer.abs().sum(-1) > 0]
    for token in x[0]:  # every dispatched row is an unshifted token
        hits = (rows - token).abs().amax(-1) < 1e-7
        assert hits.any()
    assert len(rows) == 32

    moe.type_to_experts = True  # the released code's variant: the shifted token reaches the experts
    seen.clear()
    moe(x, modality)
    shifted = x[0] + torch.where((modality == IMAGE)[:, None], moe.image_type, moe.text_type)
    rows = seen[0].reshape(-1, d)
    assert all(((rows - s).abs().amax(-1) < 1e-6).any() for s in shifted)

    plain = SparseMoE(d, 16, num_experts=e, top_k=2, type_vector=False, noisy_second=False)
    assert plain.image_type is None
    assert torch.equal(plain(x, modality).routing.experts, plain(x, torch.full((16,), TEXT)).routing.experts)


def test_flop_counter_sees_the_experts() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    s, d, h, e, k = 40, 16, 32, 4, 2
    moe = SparseMoE(d, h, num_experts=e, top_k=k, min_capacity=1, type_vector=False).train()
    c = moe.capacity(s)
    counter = FlopCounterMode(display=False)
    with counter:
        moe(torch.randn(1, s, d), torch.full((s,), TEXT))
    assert counter.get_total_flops() == 2 * s * d * e + 2 * e * c * (d * h + h * d)  # router + E x C slots


def test_gradients_reach_router_and_experts() -> None:
    torch.manual_seed(4)
    moe = SparseMoE(8, 16, num_experts=4, top_k=2).train()
    res = moe(torch.randn(2, 6, 8), torch.tensor([IMAGE] * 3 + [TEXT] * 3))
    (res.out.pow(2).sum() + res.routing.aux_loss).backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
