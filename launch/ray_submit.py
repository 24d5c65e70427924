#!/usr/bin/env python3
"""``ray job submit`` that exits with the job's own exit code, and stops it after ``--timeout``.

A thin wrapper over ``ray.job_submission.JobSubmissionClient``: it submits the entrypoint
(everything after ``--``) with the working directory and environment variables in the
``runtime_env``, streams the job's logs, and exits with the outcome, so that arc-dist's exit
codes (10 retry, 11 unrecoverable, ...) reach the scheduler that runs it; ``ray job submit``
exits 1 for any failed job. For anything else (pip packages, headers, entrypoint resources) use
``--runtime-env-json`` or ``ray job submit`` itself. See docs/ray.md.

    python launch/ray_submit.py --address http://127.0.0.1:8265 --timeout 3600 -- \\
        python examples/train_ray.py --workers 2 --steps 200 --storage-path /tmp/arc-ray

Exit: 0 SUCCEEDED; the job's exit code (1 when Ray does not know it) FAILED; 3 STOPPED (also
after ``--timeout``); 4 not submitted (no Ray, cluster unreachable, bad runtime_env); 2 usage;
130 Ctrl-C (the job is stopped first).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time

EXIT_STOPPED = 3
EXIT_SUBMIT = 4
EXIT_INTERRUPTED = 130
#: never uploaded with the working directory
EXCLUDES = [".git", ".venv", "venv", "**/__pycache__", "*.egg-info", ".*_cache"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ray_submit.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--address", help="the job API, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)")
    a("--working-dir", default=".", help="uploaded with the job (default: .)")
    a("--exclude", action="append", default=[], metavar="PATTERN", help="also not uploaded")
    a("--env", action="append", default=[], metavar="KEY=VALUE", help="for every job process")
    a("--runtime-env-json", default="{}", metavar="JSON", help="more runtime_env fields")
    a("--submission-id", help="default: Ray's")
    a("--timeout", type=float, metavar="SECONDS", help="stop the job after this long (exit 3)")
    a("entrypoint", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = p.parse_args(argv)
    args.entrypoint = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    args.address = args.address or os.environ.get("RAY_ADDRESS")
    if not args.entrypoint:
        p.error("no entrypoint: put the command after --, e.g. -- python train.py")
    if not args.address:
        p.error("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    bad = [e for e in args.env if "=" not in e or e.startswith("=")]
    if bad:
        p.error(f"--env {bad[0]!r}: use KEY=VALUE")
    try:
        args.runtime_env = dict(json.loads(args.runtime_env_json))
    except (ValueError, TypeError) as e:
        p.error(f"--runtime-env-json {args.runtime_env_json!r} is not a JSON object: {e}")
    args.runtime_env.setdefault("working_dir", os.path.abspath(args.working_dir))
    args.runtime_env["excludes"] = [*args.runtime_env.get("excludes", EXCLUDES), *args.exclude]
    if args.env:
        env_vars = args.runtime_env.setdefault("env_vars", {})
        env_vars.update(e.split("=", 1) for e in args.env)
    return args


def _log(msg: str) -> None:
    print(f"[ray_submit] {msg}", file=sys.stderr, flush=True)


def exit_code_for(info) -> int:
    """0 SUCCEEDED, 3 STOPPED, else the job's own exit code (1 when Ray does not know it)."""
    status = str(getattr(info.status, "value", info.status))
    if status in ("SUCCEEDED", "STOPPED"):
        return 0 if status == "SUCCEEDED" else EXIT_STOPPED
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and 0 < code < 256 else 1


async def _follow(client, job_id: str, timeout: float | None) -> bool:
    """Stream the job's logs until it ends; False when ``timeout`` passed first."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        await asyncio.wait_for(tail(), timeout)
    except asyncio.TimeoutError:
        return False
    except RuntimeError as e:  # the log socket closed early: the status poll decides
        _log(f"log stream ended early ({e}); waiting for the job to end")
    return True


def _wait(client, job_id: str, deadline: float):
    """The job's final info; None when ``deadline`` (monotonic) passes first."""
    while not (info := client.get_job_info(job_id)).status.is_terminal():
        if time.monotonic() > deadline:
            return None
        time.sleep(1.0)
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:
        _log(f"needs Ray's job SDK ({e}): pip install 'arc-dist[ray]' (ray[default])")
        return EXIT_SUBMIT
    entrypoint = shlex.join(args.entrypoint)
    try:
        client = JobSubmissionClient(args.address)
        job_id = client.submit_job(
            entrypoint=entrypoint, runtime_env=args.runtime_env, submission_id=args.submission_id
        )
    except Exception as e:  # noqa: BLE001 - unreachable, auth, runtime_env, duplicate id
        _log(f"could not submit to {args.address}: {type(e).__name__}: {e}")
        return EXIT_SUBMIT
    _log(f"submitted {job_id} to {args.address}: {entrypoint}")
    start = time.monotonic()
    try:
        in_time = asyncio.run(_follow(client, job_id, args.timeout))
        deadline = start + args.timeout if args.timeout is not None else float("inf")
        info = _wait(client, job_id, deadline) if in_time else None
        if info is None:
            _log(f"{job_id} ran past --timeout {args.timeout:g} s; stopping it")
            client.stop_job(job_id)
            info = _wait(client, job_id, time.monotonic() + 60)
            return exit_code_for(info) if info is not None else EXIT_STOPPED
    except KeyboardInterrupt:
        _log(f"interrupted; stopping {job_id}")
        client.stop_job(job_id)
        return EXIT_INTERRUPTED
    code = exit_code_for(info)
    detail = f": {info.message}" if info.message and code else ""
    _log(f"{job_id} {info.status.value}{detail} -> exit {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
