"""A torchrun worker for tests/test_health.py: Arc on a real gloo group, failing as MODE says.

``python health_worker.py MODE MARKER_DIR``. Every start writes ``start-<restart>-<rank>-<pid>``
and every completed ``arc.step`` writes ``step-<rank>-<n>`` under MARKER_DIR, so the test can
tell how far each rank got.

* ``device_error``: rank 0 gets chaos ``device_error`` inside ``arc.step`` at step 3; rank 1
  raises a raw CUDA-style ``RuntimeError`` from its forward pass at step 3 (what
  ``main_entry`` must classify by itself). Both must exit 12.
* ``preflight``: ``ArcConfig(preflight=True)``; the test sets ``ARC_CHAOS_PREFLIGHT`` so a
  check fails in ``Arc.__init__``, before any step.
"""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from arc_dist import Arc, ArcConfig
from arc_dist.launch import main_entry


def _touch(path: str) -> None:
    with open(path, "w"):
        pass


@main_entry
def main() -> None:
    mode, markers = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    _touch(os.path.join(markers, f"start-{restart}-{rank}-{os.getpid()}"))
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    chaos = "device_error@3/0" if mode == "device_error" else ""
    arc = Arc(model, opt, config=ArcConfig(preflight=mode == "preflight"), chaos=chaos)
    for _ in range(6):
        if mode == "device_error" and rank == 1 and arc.global_step == 3:
            raise RuntimeError(
                "CUDA error: unspecified launch failure\nCUDA kernel errors might be "
                "asynchronously reported at some other API call"
            )
        loss = model(torch.randn(16, 8)).pow(2).mean()
        loss.backward()
        action = arc.step(loss)
        _touch(os.path.join(markers, f"step-{rank}-{action.step - 1}"))
        opt.step()
        opt.zero_grad()
    arc.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
