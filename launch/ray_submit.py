#!/usr/bin/env python3
"""Submit a training entrypoint as a Ray job, stream its logs, exit with its outcome.

Usage (everything after ``--`` is the entrypoint, run on the cluster from the working dir)::

    # a local cluster (see docs/ray.md): the dashboard address
    python launch/ray_submit.py --address http://127.0.0.1:8265 -- \\
        python examples/train_ray.py --workers 2 --steps 200 --storage-path /tmp/arc-ray

    # a remote cluster: RAY_ADDRESS, requirements and environment travel in the runtime_env
    RAY_ADDRESS=http://head.example:8265 python launch/ray_submit.py \\
        --requirements requirements.txt --env ARC_LOG=info -- \\
        python examples/train_ray.py --workers 8 --gpu --storage-path s3://bucket/runs

The working directory (default: the current one) is uploaded with the job, minus ``.git``,
virtual environments, caches and anything given with ``--exclude``. Environment variables of
this shell do **not** reach the job's processes: pass them with ``--env KEY=VALUE``.

Exit status:

* 0: the job SUCCEEDED;
* the job's own exit code (1 when Ray does not know it) when it FAILED, so arc-dist's exit codes
  (10 retry, 11 unrecoverable, ...) reach the scheduler that runs this script;
* 3: the job was STOPPED (by someone else, or by ``--timeout``);
* 4: the job could not be submitted (no address, cluster unreachable, bad runtime_env);
* 130: interrupted here (Ctrl-C); the job is stopped first unless ``--keep-on-interrupt``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid

EXIT_STOPPED = 3
EXIT_SUBMIT = 4
EXIT_INTERRUPTED = 130

DEFAULT_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "**/__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "*.egg-info",
]


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ray_submit.py",
        description="Submit a training entrypoint as a Ray job, stream its logs and exit with "
        "its outcome (0 SUCCEEDED, the job's exit code or 1 FAILED, 3 STOPPED, 4 not submitted).",
        epilog="Example: python launch/ray_submit.py --address http://127.0.0.1:8265 -- "
        "python examples/train_ray.py --workers 2",
    )
    p.add_argument(
        "--address",
        default=None,
        help="the cluster's job API, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)",
    )
    p.add_argument("--working-dir", default=".", help="uploaded with the job (default: .)")
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also leave PATTERN out of the upload (gitignore syntax; repeatable)",
    )
    p.add_argument(
        "--requirements",
        default=None,
        metavar="FILE",
        help="a requirements.txt installed on the cluster for this job",
    )
    p.add_argument(
        "--pip", action="append", default=[], metavar="PKG", help="a pip package (repeatable)"
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=VALUE",
        help="an environment variable for every process of the job (repeatable)",
    )
    p.add_argument(
        "--header",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=VALUE",
        help="an HTTP header for the job API, e.g. Authorization=Bearer... (repeatable)",
    )
    p.add_argument("--submission-id", default=None, help="default: arc-<random>")
    p.add_argument(
        "--entrypoint-num-cpus",
        type=float,
        default=None,
        help="CPUs reserved for the entrypoint (driver) process; default 0",
    )
    p.add_argument(
        "--no-wait", action="store_true", help="print the submission id and exit 0 at once"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop the job if it runs longer than this (exit 3)",
    )
    p.add_argument(
        "--keep-on-interrupt",
        action="store_true",
        help="on Ctrl-C, leave the job running instead of stopping it",
    )
    p.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = p.parse_args(argv)
    if args.entrypoint and args.entrypoint[0] == "--":
        args.entrypoint = args.entrypoint[1:]
    if not args.entrypoint:
        p.error("no entrypoint: put the command after --, e.g. -- python train.py")
    args.address = args.address or os.environ.get("RAY_ADDRESS") or None
    if not args.address:
        p.error(
            "no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS "
            "(see docs/ray.md)"
        )
    if not os.path.isdir(args.working_dir):
        p.error(f"--working-dir {args.working_dir!r} is not a directory")
    if args.requirements and not os.path.isfile(args.requirements):
        p.error(f"--requirements {args.requirements!r} does not exist")
    return args


def build_runtime_env(args: argparse.Namespace) -> dict:
    """The job's runtime_env: working dir, packages and environment variables."""
    env: dict = {
        "working_dir": os.path.abspath(args.working_dir),
        "excludes": DEFAULT_EXCLUDES + list(args.exclude),
    }
    packages: list[str] = []
    if args.requirements:
        with open(args.requirements) as f:
            packages += [
                line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")
            ]
    packages += args.pip
    if packages:
        env["pip"] = packages
    if args.env:
        env["env_vars"] = dict(args.env)
    return env


def _log(msg: str) -> None:
    print(f"[ray_submit] {msg}", file=sys.stderr, flush=True)


async def _stream(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _stream_logs(client, job_id: str, deadline: float | None) -> bool:
    """Stream logs until the job ends; False when ``deadline`` passed first."""
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())

    async def run() -> None:
        await asyncio.wait_for(_stream(client, job_id), timeout)

    try:
        asyncio.run(run())
    except asyncio.TimeoutError:
        return False
    except RuntimeError as e:  # the log socket closed early: the status poll below decides
        _log(f"log stream ended early ({e}); waiting for the job to finish")
    return True


def _wait_terminal(client, job_id: str, deadline: float | None):
    while True:
        info = client.get_job_info(job_id)
        if info.status.is_terminal():
            return info
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(1.0)


def exit_code_for(info) -> int:
    """0 SUCCEEDED, the job's exit code (or 1) FAILED, 3 STOPPED."""
    status = str(getattr(info.status, "value", info.status))
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        return EXIT_STOPPED
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and 0 < code < 256 else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:
        _log(f"needs Ray's job SDK ({e}): pip install 'arc-dist[ray]' (ray[default])")
        return EXIT_SUBMIT

    entrypoint = " ".join(_quote(a) for a in args.entrypoint)
    submission_id = args.submission_id or f"arc-{uuid.uuid4().hex[:12]}"
    try:
        client = JobSubmissionClient(args.address, headers=dict(args.header) or None)
        kwargs = {}
        if args.entrypoint_num_cpus is not None:
            kwargs["entrypoint_num_cpus"] = args.entrypoint_num_cpus
        job_id = client.submit_job(
            entrypoint=entrypoint,
            submission_id=submission_id,
            runtime_env=build_runtime_env(args),
            **kwargs,
        )
    except Exception as e:  # connection refused, auth, runtime_env validation, duplicate id
        _log(f"could not submit to {args.address}: {type(e).__name__}: {e}")
        return EXIT_SUBMIT
    _log(f"submitted {job_id} to {args.address}: {entrypoint}")
    if args.no_wait:
        print(job_id)
        return 0

    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    try:
        finished = _stream_logs(client, job_id, deadline)
        info = _wait_terminal(client, job_id, deadline) if finished else None
        if info is None:
            _log(f"{job_id} ran past --timeout {args.timeout}s; stopping it")
            client.stop_job(job_id)
            info = _wait_terminal(client, job_id, time.monotonic() + 60)
            return exit_code_for(info) if info is not None else EXIT_STOPPED
    except KeyboardInterrupt:
        if args.keep_on_interrupt:
            _log(f"interrupted; {job_id} keeps running (ray job logs -f {job_id})")
        else:
            _log(f"interrupted; stopping {job_id}")
            client.stop_job(job_id)
        return EXIT_INTERRUPTED
    code = exit_code_for(info)
    detail = f": {info.message}" if info.message and code else ""
    _log(f"{job_id} {info.status.value}{detail} -> exit {code}")
    return code


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


if __name__ == "__main__":
    sys.exit(main())
