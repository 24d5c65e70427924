"""Agreement: one SUM all-reduce turns every rank's signal row into one matrix.

Each rank writes its row into its own line of a zero ``[world_size, NUM_COLS]`` float64
matrix; a SUM over ranks is then an all-gather (0 + x = x, and a NaN or Inf stays in the line
of the rank that produced it). All ranks hold the same matrix afterwards, and the decision is a
pure function of it (policy.py), which is why all ranks reach the same verdict. The matrix is
copied to the host once: the step's only host synchronisation. Under DDP the same matrix
usually rides on DDP's gradient all-reduce instead (ddp_hook.DDPRide) and this collective only
runs on deep-check steps and when the ride shows an anomaly.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .signals import NUM_COLS


def comm_device(group, param_device: torch.device) -> torch.device:
    """Where the reduced tensor lives: on the accelerator when the group's backend serves it
    (NCCL), else on the CPU (gloo, or a ``cpu:gloo,cuda:nccl`` group)."""
    if group is None or param_device.type == "cpu":
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "cpu:" not in backend:
        return param_device
    return param_device if f"{param_device.type}:" in backend else torch.device("cpu")


class Agreement:
    """Combines rows across ``group`` (None: no torch.distributed, a single process)."""

    def __init__(
        self, group, rank: int, world_size: int, device: torch.device, ncols: int = NUM_COLS
    ):
        self.group, self.rank, self.world_size = group, rank, world_size
        self.device, self.ncols = device, ncols
        self.collectives = 0
        self.host_syncs = 0
        self._mat: torch.Tensor | None = None  # reused every step

    def reduce(self, row: torch.Tensor) -> np.ndarray:
        """Collective over ``group``: every rank calls it once per step, in the same order."""
        row = row.to(self.device, non_blocking=True)
        if self.group is None or self.world_size == 1:
            mat = row.reshape(1, -1)
        else:
            if self._mat is None:
                self._mat = torch.empty(
                    self.world_size, self.ncols, dtype=torch.float64, device=self.device
                )
            mat = self._mat.zero_()
            mat[self.rank] = row
            dist.all_reduce(mat, op=dist.ReduceOp.SUM, group=self.group)
            self.collectives += 1
        return self.to_host(mat)

    def to_host(self, mat: torch.Tensor) -> np.ndarray:
        """The step's host synchronisation: the agreed matrix as float64 numpy."""
        self.host_syncs += 1
        return mat.detach().to(torch.float64).cpu().numpy()
