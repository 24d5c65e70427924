"""Real gloo ranks for the tests: ``run_ranks(fn, world_size, *args)``.

Ranks start from a *forkserver* that has imported torch once, so a rank starts in well under a
second instead of re-importing torch (3-7 s here) each time. A rank may die on purpose (SIGKILL
from a fault hook): with ``expect_death=True`` the survivors are killed after a grace period, as
torchrun would, and the dead ranks' results are ``None``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta

import torch

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(
            [
                "torch",
                "torch.distributed.checkpoint",
                "arc_dist.checkpoint",
                "tests._dist",
            ]
        )
    return _CTX


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable, rank: int, world_size: int, port: int, outdir: str, args: tuple,
           backend: str = "gloo") -> None:  # fmt: skip
    import torch.distributed as dist

    torch.set_num_threads(1)
    if world_size > 0:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
            WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        )  # fmt: skip
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=60),
        )
    try:
        result = ("ok", fn(rank, max(world_size, 1), *args))
    except BaseException as e:  # report every failure to the parent
        result = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    if world_size > 0:
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def run_ranks(
    fn: Callable,
    world_size: int,
    *args,
    timeout: float = 240,
    expect_death: bool = False,
    grace: float = 3.0,
    distributed: bool = True,
    backend: str = "gloo",
) -> list:
    """``fn(rank, world_size, *args)`` on ``world_size`` fresh processes; results in rank order.

    ``distributed=False`` (world size 1 only) runs without a process group; ``backend``: the
    process group's (``"nccl"`` needs a GPU per rank; ``fn`` sets its device). Raises when a rank
    raised, hung past ``timeout`` or died while ``expect_death`` is False; with it, a rank that
    died or raised has the result None.
    """
    ctx = _context()
    port = free_port()
    with tempfile.TemporaryDirectory() as outdir:
        os.chmod(outdir, 0o777)  # ranks may drop privileges (permission tests)
        n = world_size if distributed else 0
        procs = [
            ctx.Process(target=_entry, args=(fn, r, n, port, outdir, args, backend))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        died_at = None
        try:
            while any(p.is_alive() for p in procs):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks did not finish within {timeout}s")
                if died_at is None and any(
                    p.exitcode is not None and p.exitcode < 0 for p in procs
                ):
                    died_at = time.monotonic()
                if died_at is not None and time.monotonic() - died_at > grace:
                    break  # the launcher tears the group down once a rank is gone
                time.sleep(0.02)
        finally:
            for p in procs:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGKILL)
                p.join()
        results = []
        for r, p in enumerate(procs):
            path = os.path.join(outdir, f"rank{r}.pkl")
            if not os.path.exists(path):
                if expect_death:
                    results.append(None)
                    continue
                raise AssertionError(f"rank {r} died (exit code {p.exitcode}) without a result")
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                if expect_death:  # a survivor's collective failed against the dead peer
                    results.append(None)
                    continue
                raise AssertionError(f"rank {r} failed: {value}")
            results.append(value)
        return results
