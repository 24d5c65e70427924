"""A process for tests/test_watchdog.py: ``python watchdog_worker.py MODE``.

``hang``: beats, then blocks in ``stuck_in_a_hang`` until the watchdog ends the process (10).
``progress``: a slow first step under the grace, steady beats, a slow save inside ``allow``,
then ``stop``; exits 0 if the watchdog never fired. ``gil``: blocks inside a C call that keeps
the GIL, so only the faulthandler backstop can end the process (status 1). ``arc``: an ``Arc``
with ``hang_timeout`` trains, pauses longer than the timeout inside ``arc.allow_hang``, trains
on and closes; exits 0 if the watchdog never fired.
"""

import ctypes
import logging
import sys
import time

from arc_dist.watchdog import Watchdog

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")


def stuck_in_a_hang() -> None:
    time.sleep(120)


def main(mode: str) -> int:
    if mode == "hang":
        wd = Watchdog(timeout=1.0, grace=0.0)
        for _ in range(3):
            wd.beat()
            time.sleep(0.01)
        print("entering hang", flush=True)
        stuck_in_a_hang()
        return 0
    if mode == "progress":
        wd = Watchdog(timeout=1.5, grace=60.0)
        time.sleep(2.5)  # first step: longer than timeout, inside grace
        for _ in range(20):
            wd.beat()
            time.sleep(0.01)
        with wd.allow(60.0):  # a save
            with wd.allow(30.0):  # nested, shorter: must not cut the outer allowance
                time.sleep(0.1)
            time.sleep(2.5)
        for _ in range(20):
            wd.beat()
            time.sleep(0.01)
        wd.stop()
        time.sleep(2.5)  # stopped: must not fire
        print("survived", flush=True)
        return 0
    if mode == "arc":
        import torch

        from arc_dist import Arc, ArcConfig

        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        arc = Arc(model, opt, config=ArcConfig(hang_timeout=3.0, hang_grace=60.0))

        def train(steps: int) -> None:
            for _ in range(steps):
                loss = model(torch.randn(8, 4)).pow(2).mean()
                loss.backward()
                if not arc.step(loss).should_skip:
                    opt.step()
                opt.zero_grad()

        train(5)
        with arc.allow_hang(60.0):  # an evaluation longer than hang_timeout
            time.sleep(4.0)
        train(5)
        arc.close()
        print("survived", arc.global_step, flush=True)
        return 0
    if mode == "gil":
        wd = Watchdog(timeout=0.5, grace=0.0, backstop=1.0)
        wd.beat()
        time.sleep(0.3)  # let the watchdog thread arm the backstop
        print("holding the GIL", flush=True)
        ctypes.PyDLL(None).sleep(60)  # PyDLL keeps the GIL during the call
        return 0
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
