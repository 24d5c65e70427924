"""Recovery time after a SIGKILL of one rank, arc-dist versus plain torchrun + ``torch.save``.

Each round trains examples/gpt.py's GPT with 2 ranks on this machine, SIGKILLs rank 1's
process once rank 0 reports step ``--kill-at``, and measures

* **kill -> first step**: seconds from the SIGKILL to the first optimizer step completed by
  every rank of the restarted group (agent detection, stopping the survivors, rendezvous,
  process start and imports, process-group set-up, checkpoint load, one step);
* **steps lost**: the newest step reached before the kill minus the step the restart resumed at;
* **where the seconds go** (``--breakdown``, on by default; torchrun paths): from the agent's
  log (torchrun runs with ``LOGLEVEL=INFO``) and the timestamps the workers put in their
  ``start`` events, for the slowest rank of the restarted group: detection by the agent (kill ->
  SIGTERM to the survivors), stopping the survivors (-> the agent reports the failure), the
  agent's restart and rendezvous (-> "Starting worker group"), process creation, interpreter
  start (-> the script's first line), imports, process-group set-up, model and data, restore,
  first step. Each phase ends when the slowest rank ends it, so the phases add up to the total.

Paths compared (same model, data, checkpoint interval, monitor interval, 1 restart):

* ``arc``: ``python -m arc_dist.launch`` + examples/train_ddp.py (run by
  tests/workers/train_worker.py, which adds ``--report`` and ``--throttle``); durable DCP
  checkpoints every ``--checkpoint-every`` steps, resume from the newest *confirmed* one
  (``--confirm-after``); the node-local tier off (``--no-local-snapshots``);
* ``local``: the same with the node-local snapshot tier on (the default): healthy snapshots every
  ``--snapshot-every`` steps in /dev/shm, resume from the newest one every rank has;
* ``warm``: ``local`` under ``--warm-start``: workers are forked from a per-node zygote that has
  torch, arc-dist and the examples the worker imports (``--warm-import``, found through
  ``PYTHONPATH``) imported already;
* ``plain``: ``torchrun`` + benchmarks/_plain_worker.py: rank 0 ``torch.save``s the model and
  optimizer every ``--checkpoint-every`` steps, every (re)start ``torch.load``s it;
* ``ray``: examples/train_ray.py under Ray Train (a private local Ray instance): a worker
  SIGKILLs itself at ``--kill-at``, Ray restarts the worker group, ``arc.resume()`` continues
  (benchmarks/ray_overhead.py, run in a subprocess of its own).

    python benchmarks/recovery.py                       # 3 rounds each, markdown table
    python benchmarks/recovery.py --paths arc,local     # durable vs node-local resume only
    python benchmarks/recovery.py --paths arc,plain,ray # beside the Ray Train path
    python benchmarks/recovery.py --rounds 5 --json recovery.json

Targets on a CPU machine with 2 ranks: kill -> first step <= 5 s; <= 2 s with ``--warm-start``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line still being written
    return out


def _wait(pred, report: Path, proc: subprocess.Popen, what: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while True:
        got = pred(_events(report))
        if got:
            return got
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the job exited ({proc.returncode}) first")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        time.sleep(0.01)


_AGENT_LINE = re.compile(r"^[IWE]\d{4} (\d\d):(\d\d):(\d\d\.\d+) \d+ \S+\] (.*)$")

#: (phase, what ends it): agent log lines (regex) or worker timestamps (``start`` event keys)
PHASES = [
    ("detect", r"closing signal SIGTERM"),
    ("stop survivors", r"^failed \(exitcode"),
    ("restart + rendezvous", r"Starting worker group"),
    ("process created", "t_process"),
    ("interpreter start", "t_main"),
    ("imports", "t_imported"),
    ("process group", "t_pg"),
    ("model + data", "t_resume"),
    ("restore", "time"),
    ("first step", "first_step"),
]


def _agent_times(out: str, near: float) -> list[tuple[float, str]]:
    """(wall time, message) of torchrun's log lines; they carry the time of day only."""
    day = datetime.datetime.fromtimestamp(near).replace(hour=0, minute=0, second=0, microsecond=0)
    got = []
    for line in out.splitlines():
        m = _AGENT_LINE.match(line)
        if m:
            h, mi, sec, msg = m.groups()
            got.append((day.timestamp() + int(h) * 3600 + int(mi) * 60 + float(sec), msg))
    return got


def breakdown(t_kill: float, ev: list[dict], out: str) -> dict[str, float]:
    """Seconds per phase from the kill to the restarted group's first step (see the module
    docstring); a phase whose end was not logged is folded into the next one."""
    starts = [e for e in ev if e["event"] == "start" and e["restart"] == 1]
    firsts = [e for e in ev if e["event"] == "first_step" and e["restart"] == 1]
    agent = _agent_times(out, t_kill)
    phases, prev, mark = {}, t_kill, t_kill
    for name, end in PHASES:
        if end == "first_step":
            t = max(e["time"] for e in firsts)
        elif end.startswith("t_") or end == "time":
            vals = [e.get(end) for e in starts]
            t = max(vals) if vals and None not in vals else None
        else:
            t = next((t for t, msg in agent if t >= mark and re.search(end, msg)), None)
            mark = t if t is not None else mark
        if t is not None:
            phases[name] = t - prev
            prev = t
    return phases


def one_round(path: str, args, workdir: Path) -> dict:
    report, ckpt = workdir / "report.jsonl", workdir / "ckpt"
    common = [
        "--steps", str(args.kill_at + 15), "--checkpoint-dir", str(ckpt),
        "--checkpoint-every", str(args.checkpoint_every), "--report", str(report),
        "--log-every", "1", "--throttle", str(args.throttle), "--corpus-bytes", "300000",
        "--n-layer", str(args.n_layer), "--n-embd", str(args.n_embd),
    ]  # fmt: skip
    if path in ("arc", "local", "warm"):
        cmd = [
            sys.executable, "-m", "arc_dist.launch", "--nproc-per-node=2", "--max-restarts=1",
            *(["--warm-start", "--warm-import=gpt", "--warm-import=train_ddp"] if path == "warm" else []),
            f"--monitor-interval={args.monitor_interval}", f"--log-dir={workdir / 'logs'}",
            str(ROOT / "tests" / "workers" / "train_worker.py"), *common,
            "--confirm-after", str(args.confirm_after), "--hang-timeout", "0",
            "--snapshot-every", str(args.snapshot_every),
            *(["--no-local-snapshots"] if path == "arc" else []),
        ]  # fmt: skip
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "--max-restarts=1", f"--monitor-interval={args.monitor_interval}",
            f"--log-dir={workdir / 'logs'}", str(ROOT / "benchmarks" / "_plain_worker.py"),
            *common,
        ]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(workdir), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
           "LOGLEVEL": "INFO"}  # fmt: skip
    env.pop("ARC_CHAOS", None)
    if path == "warm":  # the zygote imports the example's modules by name
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT / "examples"), env.get("PYTHONPATH")])
        )
    log = open(workdir / "out.txt", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        _wait(
            lambda ev: any(e["event"] == "step" and e["step"] >= args.kill_at for e in ev),
            report, proc, f"step {args.kill_at}",
        )  # fmt: skip
        ev = _events(report)
        victim = next(e["pid"] for e in ev if e["event"] == "start" and e["rank"] == 1)
        os.kill(victim, signal.SIGKILL)
        t_kill = time.time()
        last = max(e["step"] for e in ev if e["event"] == "step")
        firsts = _wait(
            lambda ev: (f := [e for e in ev if e["event"] == "first_step" and e["restart"] == 1])
            and len(f) == 2 and f,
            report, proc, "the first step after the restart",
        )  # fmt: skip
        ev = _events(report)
        resumed = next(e["step"] for e in ev if e["event"] == "start" and e["restart"] == 1)
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    if rc != 0:
        raise RuntimeError(f"{path}: the job exited {rc}; see {workdir / 'out.txt'}")
    return {
        "kill_to_step_s": max(e["time"] for e in firsts) - t_kill,
        "phases": breakdown(t_kill, _events(report), (workdir / "out.txt").read_text()),
        "steps_lost": last - resumed,
        "resumed_at": resumed,
        "killed_at": last,
    }


def _ray_rounds(args, tmp: Path) -> list[dict]:
    """The Ray Train path through benchmarks/ray_overhead.py, in a process of its own."""
    out = tmp / "ray.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ray_overhead.py"), "--repeats", str(args.rounds),
           "--crash-at", str(args.kill_at), "--checkpoint-every", str(args.checkpoint_every),
           "--confirm-after", str(args.confirm_after), "--steps", str(args.kill_at + 15),
           "--paths", "arc", "--json", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT)
    runs = json.loads(out.read_text())["runs"]["arc"]
    for i, r in enumerate(runs):
        print(f"ray round {i}: kill -> first step {r['kill_to_first_resumed_step_s']:.2f} s, "
              f"steps lost {r['steps_lost']} (resumed at {r['resumed_from']})", flush=True)  # fmt: skip
    return [{"kill_to_step_s": r["kill_to_first_resumed_step_s"], "steps_lost": r["steps_lost"]}
            for r in runs]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--paths", default="arc,local,plain", help="comma-separated: arc, local, warm, plain, ray"
    )
    p.add_argument("--kill-at", type=int, default=30, help="kill once rank 0 reached this step")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--confirm-after", type=int, default=5)
    p.add_argument("--snapshot-every", type=int, default=5, help="arc paths: snapshot interval")
    p.add_argument("--monitor-interval", type=float, default=0.1)
    p.add_argument("--throttle", type=float, default=0.05, help="sleep per step, seconds")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--keep", default=None, help="keep each round's logs under this folder")
    args = p.parse_args()

    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="arc-recovery-") as tmp:
        if args.keep:
            tmp = args.keep
            os.makedirs(tmp, exist_ok=True)
        # rounds interleave the paths, so a change in the machine's load hits them alike
        paths = args.paths.split(",")
        if "ray" in paths:
            results["ray"] = _ray_rounds(args, Path(tmp))
        for r in range(args.rounds):
            for path in (p for p in paths if p != "ray"):
                workdir = Path(tmp) / f"{path}-{r}"
                workdir.mkdir(exist_ok=False)
                res = one_round(path, args, workdir)
                print(f"{path} round {r}: kill -> first step {res['kill_to_step_s']:.2f} s, "
                      f"steps lost {res['steps_lost']} (killed at {res['killed_at']}, resumed "
                      f"at {res['resumed_at']})", flush=True)  # fmt: skip
                print("    " + ", ".join(f"{k} {v:.2f}" for k, v in res["phases"].items()),
                      flush=True)  # fmt: skip
                results.setdefault(path, []).append(res)

    names = {
        "arc": "arc-dist launcher, DCP checkpoint resume",
        "local": "arc-dist launcher, node-local snapshot resume (/dev/shm)",
        "warm": "arc-dist launcher --warm-start, node-local snapshot resume",
        "plain": "plain torchrun + torch.save resume",
        "ray": "Ray Train restart + arc.resume() (DCP checkpoint)",
    }
    print(f"\n2 ranks, gloo, CPU, {os.cpu_count()} cores; checkpoint every "
          f"{args.checkpoint_every} steps, snapshot every {args.snapshot_every}; kill at step "
          f"{args.kill_at}; {args.rounds} rounds\n")  # fmt: skip
    print("| path | kill -> first step, s (median, min-max) | steps lost (median) |")
    print("| --- | --- | --- |")
    for path, rs in results.items():
        t = [r["kill_to_step_s"] for r in rs]
        lost = statistics.median(r["steps_lost"] for r in rs)
        print(
            f"| {names[path]} | {statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f}) | {lost:g} |"
        )
    timed = {p: rs for p, rs in results.items() if any(r.get("phases") for r in rs)}
    if timed:
        print("\nwhere the seconds go (median of the rounds, s; slowest rank):\n")
        print("| phase | " + " | ".join(timed) + " |")
        print("| --- |" + " --- |" * len(timed))
        for name, _ in PHASES:
            row = []
            for rs in timed.values():
                v = [r["phases"][name] for r in rs if name in r.get("phases", {})]
                row.append(f"{statistics.median(v):.2f}" if v else "-")
            print(f"| {name} | " + " | ".join(row) + " |")
    print(f"\nload average (1, 5, 15 min) at the end: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
