"""arc-dist's SIGTERM handler with real signals in fresh processes: it chains to the handler it
replaced (as Lightning installs one), leaves SIG_DFL/SIG_IGN uncalled, and in a thread other than
the main one either polls the main thread's handler or says plainly that SIGTERM is not its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(120)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = """
import logging, os, signal, sys, threading, time
logging.basicConfig(level=logging.INFO, format="%(message)s")
from arc_dist.preemption import PreemptionHandler, install_process_handler

def deliver():
    # the handler runs in the main thread at its next bytecode: give it one
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
"""


def _run(body: str) -> subprocess.CompletedProcess:
    code = PRELUDE + textwrap.dedent(body)
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=90
    )


def test_chains_to_the_python_handler_it_replaced_and_restores_it():
    r = _run(
        """
        calls = []
        def theirs(signum, frame):  # e.g. Lightning's signal connector
            calls.append(signum)
        signal.signal(signal.SIGTERM, theirs)
        h = PreemptionHandler()
        h.install()
        assert not h.requested
        deliver()
        print("requested", h.requested, "theirs", calls)
        h.uninstall()
        print("restored", signal.getsignal(signal.SIGTERM) is theirs)
        deliver()
        print("after", h.requested, calls)
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:3] == [
        "requested True theirs [15]",
        "restored True",
        "after False [15, 15]",
    ]


@pytest.mark.parametrize("before", ["SIG_DFL", "SIG_IGN"])
def test_default_and_ignore_are_not_called(before):
    r = _run(
        f"""
        signal.signal(signal.SIGTERM, signal.{before})
        h = PreemptionHandler()
        h.install()
        deliver()
        deliver()
        print("alive", h.requested)
        h.uninstall()
        print("restored", signal.getsignal(signal.SIGTERM) == signal.{before})
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["alive True", "restored True"]


def test_a_second_handler_in_the_process_sees_only_later_signals():
    r = _run(
        """
        first = PreemptionHandler()
        first.install()
        deliver()
        second = PreemptionHandler()  # e.g. the restarted Arc in the same process
        second.install()
        print(first.requested, second.requested)
        deliver()
        print(first.requested, second.requested)
        second.uninstall()
        first.uninstall()
        print(signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:3] == ["True False", "True True", "True"]


def test_in_another_thread_it_polls_the_main_threads_handler():
    r = _run(
        """
        assert install_process_handler()
        seen = {}
        def train():
            h = PreemptionHandler()
            h.install()
            seen["before"] = h.requested
            ready.set()
            go.wait(30)
            seen["after"] = h.requested
        ready, go = threading.Event(), threading.Event()
        t = threading.Thread(target=train)
        t.start()
        ready.wait(30)
        deliver()
        go.set()
        t.join()
        print(seen)
        """
    )
    assert r.returncode == 0, r.stderr
    assert "{'before': False, 'after': True}" in r.stdout
    assert "outside the main thread" not in r.stderr


def test_in_another_thread_without_it_says_so_and_leaves_sigterm_alone():
    r = _run(
        """
        def train():
            PreemptionHandler().install()
            print("installed", flush=True)
        t = threading.Thread(target=train)
        t.start()
        t.join()
        deliver()  # SIG_DFL: the process ends, as it would without arc-dist
        print("not reached")
        """
    )
    assert r.returncode == -signal.SIGTERM
    assert r.stdout == "installed\n"
    assert "outside the main thread" in r.stderr
    assert "install_process_handler()" in r.stderr


def _train_until_preempted(ckpt, previous: str, after: str = "") -> subprocess.CompletedProcess:
    """A script: ``previous`` installed as the SIGTERM handler, then Arc trains and gets SIGTERM
    before step 5; prints ``preempted CODE STEP CALLS`` and runs ``after``."""
    return _run(
        textwrap.dedent(f"""
        import torch
        from arc_dist import Arc, ArcConfig, Preempted
        calls = []
        signal.signal(signal.SIGTERM, {previous})
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        cfg = ArcConfig(async_checkpoint=False)
        arc = Arc(model, opt, checkpoint_dir={str(ckpt)!r}, config=cfg)
        try:
            for step in range(50):
                if step == 5:
                    deliver()
                loss = model(torch.ones(2, 4)).pow(2).mean()
                loss.backward()
                if not arc.step(loss).should_skip:
                    opt.step()
                opt.zero_grad()
        except Preempted as e:
            print("preempted", e.code, arc.global_step, calls)
        """)
        + textwrap.dedent(after)
    )


def test_arc_checkpoints_on_sigterm_and_the_previous_handler_still_runs(tmp_path):
    r = _train_until_preempted(tmp_path / "ck", "lambda s, f: calls.append(s)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("preempted 10 ") and r.stdout.strip().endswith("[15]"), r.stdout
    assert any(p.name.startswith("step_") for p in (tmp_path / "ck").iterdir())


def test_a_previous_handler_that_exits_waits_for_arcs_final_checkpoint(tmp_path):
    """Ray's driver installs a SIGTERM handler that calls ``sys.exit``: chained to, it would end
    the process inside the handler, before the agreed final checkpoint."""
    r = _train_until_preempted(
        tmp_path / "ck",
        "lambda s, f: sys.exit(s)",
        after="""
        deliver()  # no Arc watches any more: the previous handler ends the process as before
        print("not reached")
        """,
    )
    assert r.returncode == 15, r.stderr
    assert r.stdout.split()[:3] == ["preempted", "10", "5"], r.stdout
    assert "not reached" not in r.stdout
    assert (tmp_path / "ck" / "step_5").is_dir()
