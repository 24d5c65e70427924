"""Crash-consistency soak: SIGKILL 2-rank jobs at random moments, check every restart's resume.

Each trial runs ``python -m arc_dist.launch --nproc-per-node=2`` on benchmarks/_soak_worker.py
(DDP, async durable checkpoints every 4 steps, confirmation after 2 healthy steps, keep 2, the
node-local tier off so every resume is from durable storage) and kills it once, in one of these
phases:

* ``step``: at a random training step, one rank or the whole group;
* ``save``: while the files of a save after the first are being written (the worker slows each
  write so a save stays in flight), 0-150 ms after its first bytes, one rank or the whole group;
* ``commit``: rank 0 SIGKILLs itself right before or right after it writes a manifest;
* ``resume``: at a random step, then again 0-0.3 s into the restart's resume (while it lists,
  verifies and loads), one rank or the whole group.

Trials cycle through the phases, so half of them are aimed at a save or its commit.

torchrun restarts the group; the trial passes when training reaches its last step and, at
every restart, the catalog of the checkpoint root taken by the new rank 0 *before* it loads
(what is committed once every writer of the killed group is dead) shows that:

* the step resumed from was committed (never a partial directory: ``uncommitted_resume``);
* it is the newest committed checkpoint (resume takes the newest healthy one, and every save
  of this job is healthy), so nothing committed was passed over (``resumed_older``);
* every committed checkpoint's files match its manifest (``corrupt_committed``);
* every committed checkpoint seen is still there, or a newer committed one is, at the next
  restart and at the end (retention keeps the newest healthy and the newest confirmed ones:
  ``lost_committed``).

A launcher that does not exit 0, or a trial past its timeout, is a ``failed_restart``.

    nice python benchmarks/kill_soak.py --trials 100 --json soak.json   # 1-2 h on 2 busy cores
    python benchmarks/kill_soak.py --trials 4 --seed 1                 # a quick look
    python benchmarks/kill_soak.py --summarize soak.json more.json     # one table of runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from arc_dist.elastic.launcher import _descendants, sigkill_all

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "benchmarks" / "_soak_worker.py"
PHASES = ("step", "save", "commit", "resume")
ANOMALIES = (
    "failed_restart",
    "uncommitted_resume",
    "resumed_older",
    "corrupt_committed",
    "lost_committed",
)
STEPS, EVERY = 36, 4


def _markers(d: Path) -> list[dict]:
    out = []
    for p in sorted(d.glob("rank*.jsonl")):
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line cut by the kill
    return out


class _Job:
    def __init__(self, trial_dir: Path, worker_args: list[str]) -> None:
        self.dir = trial_dir
        self.ckpt, self.markers = trial_dir / "ckpt", trial_dir / "markers"
        self.markers.mkdir(parents=True)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("ARC_", "PET_", "TORCHELASTIC_"))
        }
        env.update(TMPDIR=str(trial_dir), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        self.log = open(trial_dir / "launcher.txt", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "arc_dist.launch", f"--log-dir={trial_dir / 'logs'}",
             "--nproc-per-node=2", "--max-restarts=3", "--shutdown-timeout=12", str(WORKER),
             "--ckpt", str(self.ckpt), "--markers", str(self.markers), "--steps", str(STEPS),
             "--every", str(EVERY), *worker_args],
            cwd=trial_dir, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.tree: set[int] = set()

    def wait_for(self, pred, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            self.tree.update(_descendants(self.proc.pid))
            for m in _markers(self.markers):
                if pred(m):
                    return m
            time.sleep(0.02)
        return None

    def worker_pids(self, restart: int) -> dict[int, int]:
        return {
            m["rank"]: m["pid"]
            for m in _markers(self.markers)
            if m["ev"] == "resuming" and m["restart"] == restart
        }

    def kill(self, restart: int, target: str, rng: random.Random) -> str:
        pids = self.worker_pids(restart)
        if not pids:
            return "nothing to kill"
        ranks = sorted(pids) if target == "group" else [rng.choice(sorted(pids))]
        for r in ranks:
            try:
                os.kill(pids[r], signal.SIGKILL)
            except ProcessLookupError:
                pass
        return f"SIGKILL ranks {ranks} of restart {restart}"

    def finish(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            self.tree.update(_descendants(self.proc.pid))
            sigkill_all([self.proc.pid, *self.tree])
            self.proc.wait()
            self.log.close()


def _final_catalog(ckpt: Path) -> list[dict]:
    from arc_dist.checkpoint import Storage, scan, verify

    if not ckpt.exists():
        return []
    storage = Storage(str(ckpt))
    return [
        {"step": i.step, "state": i.state, "problems": verify(storage, i) if i.committed else []}
        for i in scan(storage)
    ]


def check(markers: list[dict], rc: int | None, final: list[dict]) -> tuple[list[str], list[dict]]:
    """The anomalies of one trial (see the module docstring) and its restarts' resumes."""
    anomalies: list[str] = []
    r0 = [m for m in markers if m["rank"] == 0]
    done = [m for m in r0 if m["ev"] == "done"]
    if rc != 0 or not done or done[-1]["step"] < STEPS:
        anomalies.append("failed_restart")
    catalogs = {m["restart"]: m["catalog"] for m in r0 if m["ev"] == "resuming"}
    resumed = {m["restart"]: m["step"] for m in r0 if m["ev"] == "resumed"}
    resumes = []
    observed: list[list[dict]] = []
    for restart in sorted(catalogs):
        cat = catalogs[restart]
        observed.append(cat)
        if restart not in resumed:
            continue  # killed during this resume: the next restart's catalog tells
        step = resumed[restart]
        committed = {c["step"] for c in cat if c["state"] != "partial"}
        confirmed = {c["step"] for c in cat if c["state"] == "confirmed"}
        resumes.append({"restart": restart, "step": step, "committed": sorted(committed),
                        "confirmed": sorted(confirmed)})  # fmt: skip
        if any(c["problems"] for c in cat):
            anomalies.append("corrupt_committed")
        if step != 0 and step not in committed or step == 0 and committed:
            anomalies.append("uncommitted_resume" if step not in committed else "resumed_older")
        expect = max(committed or {0})
        if step in committed and step != expect:
            anomalies.append("resumed_older")
    observed.append(final)
    if any(c["problems"] for c in final):
        anomalies.append("corrupt_committed")
    for i, cat in enumerate(observed[:-1]):
        later = [x for x in observed[i + 1] if x["state"] != "partial"]
        for c in cat:
            if c["state"] != "partial" and not any(x["step"] >= c["step"] for x in later):
                anomalies.append("lost_committed")
    return sorted(set(anomalies)), resumes


def run_trial(i: int, rng: random.Random, root: Path, timeout: float = 300) -> dict:
    phase = PHASES[i % len(PHASES)]  # as many of each: half aimed at a save or its commit
    target = "rank" if phase == "commit" else rng.choice(("rank", "group"))
    trial_dir = root / f"trial_{i:03d}"
    args: list[str] = []
    detail: dict = {"phase": phase, "target": target}
    if phase == "save":
        args += ["--slow-write", "0.0005"]  # ~800 writes a save: it lasts ~0.3 s
    if phase == "commit":
        point = rng.choice(("before_manifest", "after_manifest"))
        step = rng.randrange(EVERY, STEPS - EVERY, EVERY)
        args += ["--self-kill", f"{point}:{step}"]
        detail.update(point=point, at_step=step)
    t0 = time.monotonic()
    job = _Job(trial_dir, args)
    kills = []
    try:
        if phase in ("step", "resume"):
            at = rng.randrange(3, STEPS - 3)
            if job.wait_for(lambda m: m["ev"] == "step" and m["step"] >= at, 240):
                kills.append(job.kill(0, target, rng))
            detail["at_step"] = at
        elif phase == "save":  # a later save, so that older committed ones are at stake
            at = rng.randrange(2 * EVERY, STEPS - 2 * EVERY + 1, EVERY)
            # the first save from that step on (one due while another writes is skipped)
            m = job.wait_for(lambda m: m["ev"] == "save_write" and m["step"] >= at, 240)
            if m:
                time.sleep(rng.uniform(0, 0.15))
                kills.append(job.kill(0, target, rng))
                detail["at_step"] = m["step"]
        if phase == "resume" and kills:
            if job.wait_for(lambda m: m["ev"] == "resuming" and m["restart"] == 1, 240):
                time.sleep(rng.uniform(0, 0.3))  # listing, verification, load: ~0.1-0.5 s
                kills.append(job.kill(1, rng.choice(("rank", "group")), rng))
        rc = job.finish(timeout - (time.monotonic() - t0))
    except BaseException:
        job.finish(1)
        raise
    final = _final_catalog(job.ckpt)
    markers = _markers(job.markers)
    anomalies, resumes = check(markers, rc, final)
    if phase == "commit":
        kills = (
            [f"self-kill at {detail['point']} of step {detail['at_step']}"]
            if any(m["ev"] == "self_kill" for m in markers)
            else []
        )
    return {
        "trial": i, **detail, "kills": kills, "rc": rc, "anomalies": anomalies,
        "resumes": resumes, "seconds": round(time.monotonic() - t0, 1),
        "dir": str(trial_dir),
    }  # fmt: skip


def summarize(results: list[dict]) -> str:
    rows = ["| phase | trials | kills landed | restarts checked | " + " | ".join(ANOMALIES) + " |",
            "| --- " * (4 + len(ANOMALIES)) + "|"]  # fmt: skip
    for phase in (*PHASES, "all"):
        rs = [r for r in results if phase in ("all", r["phase"])]
        if not rs:
            continue
        counts = Counter(a for r in rs for a in r["anomalies"])
        landed = sum(1 for r in rs if r["kills"])
        checked = sum(1 for r in rs for x in r["resumes"] if x["restart"] > 0)
        rows.append(f"| {phase} | {len(rs)} | {landed} | {checked} | "
                    + " | ".join(str(counts[a]) for a in ANOMALIES) + " |")  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every trial's record here")
    p.add_argument("--root", help="trial folders go here (default: a new temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the trial folders")
    p.add_argument("--summarize", nargs="+", metavar="JSON", help="only print the table of runs")
    args = p.parse_args(argv)
    if args.summarize:
        results = [r for path in args.summarize for r in json.loads(Path(path).read_text())]
        print(f"{len(results)} trials\n{summarize(results)}")
        return 1 if any(r["anomalies"] for r in results) else 0
    root = Path(args.root or tempfile.mkdtemp(prefix="arc-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    results = []
    t0 = time.monotonic()
    for i in range(args.trials):
        r = run_trial(i, rng, root)
        results.append(r)
        print(f"trial {i:3d} {r['phase']:>6}/{r['target']:<5} rc={r['rc']} {r['seconds']:5.1f}s "
              f"resumes={[x['step'] for x in r['resumes']]} {r['anomalies'] or 'ok'}",
              flush=True)  # fmt: skip
        if not r["anomalies"] and not args.keep:
            shutil.rmtree(r["dir"], ignore_errors=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\n{len(results)} trials in {(time.monotonic() - t0) / 60:.1f} min (seed {args.seed})")
    print(summarize(results))
    return 1 if any(r["anomalies"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
