"""A tiny torchrun worker for tests/test_launch_torchrun.py: fails in the way argv[1] names.

``python launch_worker.py MODE MARKER_DIR``. Every start writes ``MARKER_DIR/start-<restart>-
<rank>-<pid>.json`` (the environment the launcher gave it) before doing anything else, so the
test can count attempts and clean up stray processes. No torch.distributed group is formed:
the launcher's exit-code mapping does not depend on one.
"""

import json
import os
import signal
import sys
import time

from arc_dist.errors import HardwareError, UnrecoverableError
from arc_dist.launch import main_entry


@main_entry
def main() -> None:
    mode, marker_dir = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    env = {k: os.environ.get(k) for k in ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "WORLD_SIZE")}
    path = os.path.join(marker_dir, f"start-{restart}-{rank}-{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump(env, f)
    if mode == "ok":
        return
    if mode == "unrecoverable":
        raise UnrecoverableError(f"step 7: nonfinite_loss persisted on rank {rank}")
    if mode == "hardware":
        raise HardwareError(f"rank {rank}: simulated CUDA error: uncorrectable ECC error")
    if mode == "kill":
        if rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(120)  # the agent stops the others
    if mode == "bug":  # the same bug in the script on every start, before any step
        raise KeyError("'labels'")
    if mode == "sleep":
        time.sleep(120)
    raise SystemExit(f"unknown mode {mode!r}")


def plain_record() -> None:
    """A script with torch's ``@record`` only (no ``main_entry``): no record in the launcher's
    folder, only torch's error file, which torchrun's agent copies as the root cause."""
    from torch.distributed.elastic.multiprocessing.errors import record

    @record
    def run() -> None:
        marker_dir = sys.argv[2]
        path = os.path.join(marker_dir, f"start-0-{os.environ['RANK']}-{os.getpid()}.json")
        with open(path, "w") as f:
            json.dump({}, f)
        raise UnrecoverableError("a script with torch's @record only")

    run()


if __name__ == "__main__":
    plain_record() if sys.argv[1] == "plain_record" else main()
