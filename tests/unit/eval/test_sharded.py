"""evlp.eval.sharded: the split over ranks and the padded gather, with the ranks simulated in one process.

The real collective (two gloo processes) is exercised by tests/integration/test_eval_ranks.py; here every rank's
share is computed and padded as that rank would, the all_gather is the list of padded shares, and the result is
compared with the items themselves.
"""

from __future__ import annotations

import pytest
import torch

from evlp.dist import DistInfo
from evlp.eval.sharded import (
    from_main,
    gather_shares,
    join_shares,
    launcher_device,
    launcher_ranks,
    map_shares,
    pad_rows,
    share,
    share_sizes,
)

CASES = [(n, w) for n in range(10) for w in range(1, 5)]


@pytest.mark.parametrize("n,world", CASES)
def test_shares_cover_every_item_once_in_order(n: int, world: int) -> None:
    shares = [share(n, DistInfo(rank=r, world_size=world)) for r in range(world)]
    assert [i for s in shares for i in s] == list(range(n))  # union = all, each once, order kept
    sizes = [len(s) for s in shares]
    assert sizes == share_sizes(n, world)
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)  # lower ranks take the extras


@pytest.mark.parametrize("n,world", CASES)
def test_padded_gather_returns_exactly_the_items(n: int, world: int) -> None:
    items = torch.arange(1, 3 * n + 1, dtype=torch.float32).view(n, 3) + 0.5  # no row is all zeros like padding
    sizes = share_sizes(n, world)
    wire = []
    for r in range(world):
        s = share(n, DistInfo(rank=r, world_size=world))
        wire.append(pad_rows(items[s.start:s.stop], max(sizes)))
    assert all(p.shape == (max(sizes), 3) for p in wire)  # what all_gather needs
    got = join_shares(wire, sizes)
    assert torch.equal(got, items)


def test_pad_rows_adds_zero_rows_only() -> None:
    x = torch.ones(2, 4, dtype=torch.int64)
    padded = pad_rows(x, 5)
    assert padded.shape == (5, 4) and padded.dtype == torch.int64
    assert torch.equal(padded[:2], x) and not padded[2:].any()
    assert pad_rows(x, 2) is x
    with pytest.raises(ValueError, match="cannot pad 2 rows down to 1"):
        pad_rows(x, 1)


def test_one_process_needs_no_process_group() -> None:
    assert not torch.distributed.is_initialized()
    x = torch.randn(7, 2)
    assert torch.equal(gather_shares(x, 7, DistInfo()), x)
    calls = []

    def double(chunk: list[int]) -> torch.Tensor:
        calls.append(list(chunk))
        return torch.tensor(chunk) * 2

    assert map_shares(double, list(range(7)), DistInfo()).tolist() == [2 * i for i in range(7)]
    assert calls == [list(range(7))]  # one call with every item
    assert from_main({"a": 1}, DistInfo()) == {"a": 1}


def test_map_shares_calls_fn_on_this_ranks_share_only() -> None:
    # rank 1 of 3 over 7 items holds items 3..4; gathering needs the group, so stop before it
    seen = []

    def fn(chunk: list[int]) -> torch.Tensor:
        seen.append(list(chunk))
        raise StopIteration

    with pytest.raises(StopIteration):
        map_shares(fn, list(range(7)), DistInfo(rank=1, world_size=3))
    assert seen == [[3, 4]]


def test_wrong_share_is_refused() -> None:
    with pytest.raises(ValueError, match="rank 0 holds 6 rows but its share of 7 over 1 ranks is 7"):
        gather_shares(torch.zeros(6, 2), 7, DistInfo())
    with pytest.raises(ValueError, match="share_sizes needs"):
        share_sizes(-1, 2)


def test_without_a_launcher_this_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launcher_ranks() == DistInfo()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launcher_ranks() == DistInfo()
    assert launcher_device(DistInfo()) is None
    assert not torch.distributed.is_initialized()
