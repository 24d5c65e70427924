"""The ``arc-dist`` command line (console script ``arc_dist.cli:main``).

One ``argparse`` subcommand per concern; add one with the ``@subcommand`` decorator (a function
that receives the subparsers object and registers its parser with ``set_defaults(func=...)``;
``func(args)`` returns the exit code). Heavy imports stay inside the command functions.

Checkpoint commands (any fsspec URL; ``-o KEY=VALUE`` passes storage options, e.g.
``-o endpoint_url=http://127.0.0.1:9000``; values are parsed as JSON when they can be)::

    arc-dist checkpoints URL             list step, state, time, world size, size
    arc-dist verify URL[/step_N]         re-read every file, compare sizes and checksums
    arc-dist prune URL --keep K          keep the K newest committed (and newest confirmed, healthy)

Run report (``report.py``)::

    arc-dist report RUN_DIR_OR_URL [--out DIR] [--json]

Exit codes: 0 fine, 1 damage found (``verify``), 2 bad usage or nothing to act on.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def subcommand(register: Callable[[argparse._SubParsersAction], None]):
    """Decorator: ``register(subparsers)`` adds one subcommand."""
    _SUBCOMMANDS.append(register)
    return register


def _storage_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(
                f"arc-dist: -o {pair!r} is not KEY=VALUE (e.g. -o endpoint_url=http://host:9000)"
            )
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o",
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option (repeatable); credentials are better left to the environment",
    )


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _split_step(url: str) -> tuple[str, int | None]:
    from .checkpoint.manifest import parse_step_dir

    head, _, tail = url.rstrip("/").rpartition("/")
    step = parse_step_dir(tail)
    return (head, step) if step is not None and head else (url, None)


def _open(url: str, args) -> object:
    """The checkpoint root at ``url``; a usage error (exit 2) when nothing is there."""
    from .checkpoint.storage import Storage

    storage = Storage(url, _storage_options(args.storage_option))
    storage.fs.invalidate_cache()
    if not storage.fs.isdir(storage.root):
        what = "is a file" if storage.fs.isfile(storage.root) else "does not exist"
        raise _UsageError(
            f"{storage.display} {what}, not a checkpoint directory. Fix: pass the checkpoint_dir "
            "the job writes to (the folder or bucket prefix holding step_<N>/)"
        )
    return storage


class _UsageError(Exception):
    """A URL or flag the command cannot act on: a message and exit code 2, no traceback."""


# -- checkpoints --------------------------------------------------------------------------------
def _cmd_checkpoints(args) -> int:
    import time

    from .checkpoint.catalog import scan

    storage = _open(args.url, args)
    infos = scan(storage)
    if args.json:
        out = []
        for i in infos:
            m = i.manifest
            out.append(
                {
                    "step": i.step,
                    "state": i.state,
                    "path": storage.to_url(i.path),
                    "bytes": i.nbytes,
                    "world_size": m.world_size if m else None,
                    "unix_time": m.unix_time if m else None,
                    "manifest_error": i.manifest_error or i.read_error,
                }
            )
        print(json.dumps(out, indent=1))
        return 0
    if not infos:
        print(f"no checkpoints in {storage.display}")
        return 0
    print(f"{'step':>10}  {'state':<10} {'time (UTC)':<20} {'world':>5} {'size':>10}")
    for i in infos:
        m = i.manifest
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(m.unix_time)) if m else "-"
        world = str(m.world_size) if m else "-"
        problem = i.manifest_error or i.read_error
        state = i.state if problem is None else "unreadable"
        print(f"{i.step:>10}  {state:<10} {when:<20} {world:>5} {_human(i.nbytes):>10}")
        if problem:
            print(f"{'':>12}{problem}")
    return 0


@subcommand
def _register_checkpoints(sub) -> None:
    p = sub.add_parser("checkpoints", help="list the checkpoints under URL")
    p.add_argument("url", help="checkpoint root: a path or fsspec URL (s3://bucket/run)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_storage_args(p)
    p.set_defaults(func=_cmd_checkpoints)


# -- verify -------------------------------------------------------------------------------------
def _cmd_verify(args) -> int:
    from .checkpoint.catalog import scan, verify
    from .checkpoint.storage import storage_fault

    root, step = _split_step(args.url)
    storage = _open(root, args)
    infos = scan(storage)
    if step is not None:
        infos = [i for i in infos if i.step == step]
        if not infos:
            print(f"step_{step}: not found in {storage.display}")
            return 2
    if not any(i.committed for i in infos) and step is None:
        print(f"no checkpoints in {storage.display}")
        return 2
    damaged = 0
    for info in infos:
        if not info.committed:
            print(f"step_{info.step}: partial (no manifest: an incomplete save, not a checkpoint)")
            damaged += step is not None
            continue
        try:
            problems = verify(storage, info)
        except Exception as e:
            if not storage_fault(e):
                raise
            damaged += 1
            print(f"step_{info.step}: UNREADABLE (a storage error, not proven damaged)")
            print(f"    {type(e).__name__}: {e}")
            continue
        if problems:
            damaged += 1
            print(f"step_{info.step}: DAMAGED")
            for p in problems:
                print(f"    {p}")
        else:
            n = len(info.manifest.files)
            print(
                f"step_{info.step}: ok ({info.state}, {n} files, {_human(info.manifest.total_bytes)})"
            )
    return 1 if damaged else 0


@subcommand
def _register_verify(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="check every file's size and checksum against the manifests",
        description="Exit code 1 when any checkpoint is damaged (or URL/step_N is not a checkpoint).",
    )
    p.add_argument("url", help="checkpoint root, or one checkpoint: URL/step_N")
    _add_storage_args(p)
    p.set_defaults(func=_cmd_verify)


# -- prune --------------------------------------------------------------------------------------
def _cmd_prune(args) -> int:
    import logging

    from .checkpoint import retention
    from .checkpoint.catalog import scan
    from .checkpoint.lifecycle import resume_order, trusted

    if args.keep < 1:
        print(f"arc-dist prune: --keep {args.keep} is invalid; keep at least 1", file=sys.stderr)
        return 2
    storage = _open(args.url, args)
    infos = scan(storage)
    healthy = [i.step for i in resume_order(infos) if trusted(i)][:1]  # what a resume loads
    victims = retention.plan_retention(infos, args.keep, protect=set(healthy))
    if not victims:
        print("nothing to prune")
        return 0
    for v in victims:
        print(
            f"{'would remove' if args.dry_run else 'removing'} step_{v.step} ({v.state}, {_human(v.nbytes)})"
        )
    if not args.dry_run:
        removed = retention.delete(storage, victims, logging.getLogger("arc_dist"))
        if len(removed) != len(victims):
            print(
                f"removed {len(removed)} of {len(victims)}; see the warnings above", file=sys.stderr
            )
            return 1
    return 0


@subcommand
def _register_prune(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="delete old checkpoints and partial directories",
        description="Keeps the K newest committed checkpoints, the newest confirmed one and the "
        "newest healthy one (the one a resume loads); "
        "removes partial directories older than the newest commit. Do not run it while a job "
        "is saving to URL.",
    )
    p.add_argument("url")
    p.add_argument("--keep", type=int, required=True, metavar="K")
    p.add_argument("--dry-run", action="store_true", help="print what would be removed")
    _add_storage_args(p)
    p.set_defaults(func=_cmd_prune)


# -- report (arc_dist/observe/report.py) ----------------------------------------------------------------
@subcommand
def _register_report(sub) -> None:
    from .observe import report

    p = sub.add_parser(
        "report",
        help="summarise a run's event log; draw report.png and report.html",
        description="Reads RUN_DIR_OR_URL/events.jsonl (and the checkpoints there), prints faults "
        "by kind and rank, recoveries, steps and time lost, checkpoints and the mean time between "
        "failures, and writes report.png and report.html to --out. Needs arc-dist[report].",
    )
    report.add_arguments(p)
    _add_storage_args(p)
    p.set_defaults(func=lambda args: report.run(args, _storage_options(args.storage_option)))


# -- k8s ---------------------------------------------------------------------------------------
def _cmd_k8s(args) -> int:
    from .k8s import render

    try:
        render.run(args)
    except ValueError as e:
        raise _UsageError(str(e)) from None
    return 0


@subcommand
def _register_k8s(sub) -> None:
    from .k8s import render

    p = sub.add_parser(
        "k8s",
        help="print the Kubernetes manifests of a run (Job, JobSet, TrainJob, PyTorchJob, RayJob)",
        description="Renders the manifests shipped in arc_dist/k8s/manifests/ for one run and "
        "prints them (pipe to kubectl apply -f -). Needs PyYAML (arc-dist[k8s]). See "
        "docs/kubernetes.md.",
    )
    render.add_arguments(p)
    p.set_defaults(func=_cmd_k8s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arc-dist", description="arc-dist command line tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _SUBCOMMANDS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from .checkpoint.storage import storage_fault

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except _UsageError as e:
        print(f"arc-dist {args.command}: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the storage's own errors (botocore's are not OSErrors) too
        if not (isinstance(e, (OSError, ValueError)) or storage_fault(e)):
            raise
        print(f"arc-dist {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
