"""Restoring a snapshot makes the optimizer state exactly the snapshot's.

Parameters can gain optimizer state after a snapshot (a second head trained later, a layer
unfrozen later, the first steps before any state exists) or lose it (a reset): after a restore
the state must be what it was, so training continues exactly as if the detour never happened.
Run on a plain module in one process and on FSDP2 (DTensor state) on two real gloo ranks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from arc_dist.silent import replica_digest
from arc_dist.snapshot import SnapshotStore

from ._dist import run_ranks

pytestmark = pytest.mark.timeout(120)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.a = nn.Linear(16, 1)
        self.b = nn.Linear(16, 1)

    def forward(self, x, head: str):
        return getattr(self, head)(torch.tanh(self.body(x)))


def _setup(fsdp: bool):
    torch.manual_seed(0)
    model = TwoHeads()
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(model, opt, heads: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for head in heads:
        x = torch.randn(16, 8, generator=gen)
        loss = (model(x, head) - x.sum(1, keepdim=True)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _state_keys(opt) -> list:
    params = [p for g in opt.param_groups for p in g["params"]]
    return [sorted(opt.state[p]) if p in opt.state else None for p in params]


def _detour_and_back(rank, world, fsdp: bool, first: str) -> dict:
    """Snapshot after ``first``, wander off (head b gains state, the body loses its state),
    restore, train on: the result must equal a run that never wandered."""
    model, opt = _setup(fsdp)
    store = SnapshotStore(model, opt, keep=2)
    _train(model, opt, first, seed=1)
    keys_at_snapshot = _state_keys(opt)
    snap = store.take(len(first), {})
    _train(model, opt, "bba", seed=2)
    for p in model.body.parameters():
        opt.state.pop(p, None)
    store.restore(snap, lambda extra: None)
    keys_restored = _state_keys(opt)
    _train(model, opt, "aa", seed=3)

    ref_model, ref_opt = _setup(fsdp)
    _train(ref_model, ref_opt, first, seed=1)
    _train(ref_model, ref_opt, "aa", seed=3)
    kinds = sorted({type(v).__name__ for st in opt.state.values() for v in st.values()})
    return dict(
        keys_at_snapshot=keys_at_snapshot,
        keys_restored=keys_restored,
        digest=replica_digest(model),
        reference=replica_digest(ref_model),
        kinds=kinds,
    )


@pytest.mark.parametrize("first", ["", "aaa"])  # before any state exists; head a only
def test_plain_restore_brings_back_exactly_the_snapshot_state(first):
    out = _detour_and_back(0, 1, False, first)
    assert out["keys_restored"] == out["keys_at_snapshot"]
    assert out["digest"] == out["reference"]


@pytest.mark.parametrize("first", ["", "aaa"])
def test_fsdp2_restore_brings_back_exactly_the_snapshot_state(first):
    results = run_ranks(_detour_and_back, 2, True, first, timeout=100)
    for out in results:
        assert out["keys_restored"] == out["keys_at_snapshot"]
        assert out["digest"] == out["reference"]
        if first:  # the moments are DTensors again, also the rebuilt ones (the body's)
            assert out["kinds"] == ["DTensor", "Tensor"]
