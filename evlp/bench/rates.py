"""The reference rates of ``evlp bench train``: model FLOPs counted with torch's ``FlopCounterMode``, the matmul
rate of a large square product, and the step's own matrix products replayed alone (:class:`Replay`: the rate at
the model's sizes)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``cpu (N threads)``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int | None = None) -> float:
    """FLOP/s of a square matrix product on ``device`` in ``dtype`` (the best of ``repeats`` after a warm-up).

    The best of many short rounds: on a CPU one product takes ~40 ms, and a handful of rounds left the rate (and
    so the MFU) 20 % apart between runs of the same step; the best of 12 is stable to a few percent.
    """
    n = n or (8192 if device.type == "cuda" else 1536)
    repeats = repeats or (3 if device.type == "cuda" else 12)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    inner = 10 if device.type == "cuda" else 1
    best = float("inf")
    for i in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        if i:  # the first round warms up
            best = min(best, (time.perf_counter() - t0) / inner)
    return 2.0 * n**3 / best


def count_flops(fn: Any, products: list | None = None) -> float:
    """Model FLOPs of ``fn()`` (forward and backward inside it), attention on the math kernel; with ``products``
    (a list), every matrix product and convolution it runs is appended to it (:class:`_Products`)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    recorder = _Products(products) if products is not None else contextlib.nullcontext()
    with sdpa_kernel(SDPBackend.MATH), counter, recorder:
        fn()
    return float(counter.get_total_flops())


class _Products(TorchDispatchMode):
    """Records each matrix product and convolution a block of code runs: ``(op, argument signature)``, tensors
    as ``("tensor", shape, stride, dtype, device)``, so that :class:`Replay` can run the same calls on
    fresh inputs."""

    def __init__(self, calls: list) -> None:
        super().__init__()
        aten = torch.ops.aten
        self.calls, self.ops = calls, {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
                                       aten.convolution.default, aten.convolution_backward.default}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in self.ops:
            self.calls.append((func, tuple(_signature(a) for a in args), tuple(sorted((kwargs or {}).items()))))
        return func(*args, **(kwargs or {}))


def _signature(arg: Any) -> Any:
    if isinstance(arg, torch.Tensor):
        return ("tensor", tuple(arg.shape), tuple(arg.stride()), arg.dtype, arg.device)
    if isinstance(arg, (list, tuple)):
        return tuple(_signature(a) for a in arg)
    return arg


def _materialise(sig: Any) -> Any:
    if isinstance(sig, tuple) and len(sig) == 5 and sig[0] == "tensor":
        _, shape, stride, dtype, device = sig  # the storage the layout spans (a broadcast one spans less)
        span = 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if all(shape) else 0
        base = torch.empty(span, dtype=dtype, device=device)
        base = base.normal_() if base.is_floating_point() else base.zero_()
        return base.as_strided(shape, stride)
    if isinstance(sig, tuple):
        return [_materialise(s) for s in sig]
    return sig


class Replay:
    """The recorded matrix products and convolutions of a step (:func:`count_flops` with ``products``), run again
    on random inputs of the same shapes, strides and dtypes, one round at a time: each distinct call as often as
    it was made, after a warm-up call, one call's inputs held at a time. ``flops`` is the round's FLOPs (counted
    once, here); ``best_rate()`` the rate of the best time each call took over all rounds so far."""

    def __init__(self, calls: list, device: torch.device) -> None:
        import collections

        from torch.utils.flop_counter import FlopCounterMode

        self.device, self.counts = device, list(collections.Counter(calls).items())
        self.flops = 0.0
        for (func, args, kwargs), n in self.counts:
            counter = FlopCounterMode(display=False)
            with counter:
                func(*[_materialise(a) for a in args], **dict(kwargs))
            self.flops += n * float(counter.get_total_flops())
        self.best = [float("inf")] * len(self.counts)

    def round(self) -> float:
        """Seconds of one round (the sum of its calls' times)."""
        total = 0.0
        for i, ((func, args, kwargs), n) in enumerate(self.counts):
            inputs, options = [_materialise(a) for a in args], dict(kwargs)
            func(*inputs, **options)  # warm-up
            sync(self.device)
            t0 = time.perf_counter()
            for _ in range(n):
                func(*inputs, **options)
            sync(self.device)
            spent = time.perf_counter() - t0
            self.best[i] = min(self.best[i], spent)
            total += spent
            del inputs
        return total

    def best_rate(self) -> float:
        seconds = sum(self.best)
        return self.flops / seconds if 0 < seconds < float("inf") else float("nan")
