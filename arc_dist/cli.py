"""The ``arc-dist`` command line (console script ``arc_dist.cli:main``).

One ``argparse`` subcommand per concern; add one with the ``@subcommand`` decorator (a function
that receives the subparsers object and registers its parser with ``set_defaults(func=...)``;
``func(args)`` returns the exit code). Heavy imports stay inside the command functions.

Checkpoint commands (any fsspec URL; ``-o KEY=VALUE`` passes storage options, e.g.
``-o endpoint_url=http://127.0.0.1:9000``; values are parsed as JSON when they can be)::

    arc-dist checkpoints URL             list step, state, time, world size, size
    arc-dist verify URL[/step_N]         re-read every file, compare sizes and checksums
    arc-dist prune URL --keep K          keep the K newest committed (and newest confirmed, healthy)
    arc-dist export URL[/step_N] --to torch|safetensors|torchtitan [--model-only] [--out FILE]

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
class _Progress:
    """Bytes and files verified so far and the read rate, on stderr: redrawn in place on a
    terminal, one line a second otherwise (``--progress`` into a log)."""

    def __init__(self, files: int, nbytes: int, enabled: bool) -> None:
        import time

        self.total_files, self.total_bytes = files, nbytes
        self.files = self.bytes = 0
        self.enabled, self.tty = enabled, sys.stderr.isatty()
        self._clock = time.monotonic
        self.start = self._last = self._clock()

    def advance(self, nbytes: int) -> None:
        self.files += 1
        self.bytes += nbytes
        now = self._clock()
        if not self.enabled or (not self.tty and now - self._last < 1 and not self.finished):
            return
        self._last = now
        rate = self.bytes / max(now - self.start, 1e-6)
        line = (
            f"verify: {self.files}/{self.total_files} files, {_human(self.bytes)}/"
            f"{_human(self.total_bytes)}, {_human(rate)}/s"
        )
        sys.stderr.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        if self.tty and self.finished:
            sys.stderr.write("\n")
        sys.stderr.flush()

    @property
    def finished(self) -> bool:
        return self.files >= self.total_files


def _verify_one(storage, info, progress: _Progress) -> list[str]:
    """``catalog.verify`` file by file, so that progress moves with each file read."""
    from .checkpoint.catalog import verify

    if info.manifest is None:
        return verify(storage, info)
    problems = []
    for name in sorted(info.manifest.files):
        problems += verify(storage, info, [name])
        progress.advance(info.manifest.files[name].size)
    return problems


def _cmd_verify(args) -> int:
    from .checkpoint.catalog import scan
    from .checkpoint.storage import storage_fault

    root, step = _split_step(args.url)
    storage = _open(root, args)
    infos = scan(storage)
    if step is not None:
        infos = [i for i in infos if i.step == step]
        if not infos:
            raise _UsageError(f"step_{step}: not found in {storage.display}")
    if not any(i.committed for i in infos) and step is None:
        raise _UsageError(f"no checkpoints in {storage.display}")
    readable = [i.manifest for i in infos if i.manifest is not None]
    progress = _Progress(
        sum(len(m.files) for m in readable),
        sum(m.total_bytes for m in readable),
        enabled=not args.json and (args.progress or sys.stderr.isatty()),
    )
    results = []  # (step, status, problems)
    for info in infos:
        if not info.committed:
            # not a checkpoint: damage only when it was asked for by name
            status = "partial" if step is None else "damaged"
            results.append((info, status, ["no manifest: an incomplete save, not a checkpoint"]))
            continue
        try:
            problems = _verify_one(storage, info, progress)
        except Exception as e:
            if not storage_fault(e):
                raise
            results.append((info, "unreadable", [f"{type(e).__name__}: {e}"]))
            continue
        results.append((info, "damaged" if problems else "ok", problems))
    damaged = sum(status in ("damaged", "unreadable") for _, status, _ in results)
    if args.json:
        rows = [
            {"step": i.step, "state": i.state, "status": st, "problems": probs}
            for i, st, probs in results
        ]
        print(json.dumps(rows, indent=1))
        return 1 if damaged else 0
    for info, status, problems in results:
        if status == "ok":
            n, size = len(info.manifest.files), _human(info.manifest.total_bytes)
            print(f"step_{info.step}: ok ({info.state}, {n} files, {size})")
            continue
        if not info.committed:
            print(f"step_{info.step}: partial ({problems[0]})")
            continue
        head = (
            "DAMAGED" if status == "damaged" else "UNREADABLE (a storage error, not proven damaged)"
        )
        print(f"step_{info.step}: {head}")
        for p in problems:
            print(f"    {p}")
    return 1 if damaged else 0


@subcommand
def _register_verify(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="check every file's size and checksum against the manifests",
        description="Re-reads every file of every committed checkpoint (or of URL/step_N). Exit "
        "code 0: all intact; 1: a checkpoint is damaged or unreadable, or URL/step_N is a partial "
        "save; 2: nothing to verify (no checkpoints, step_N not found) or bad usage.",
    )
    p.add_argument("url", help="checkpoint root, or one checkpoint: URL/step_N")
    p.add_argument(
        "--progress",
        action="store_true",
        help="show files and bytes done and the read rate on stderr (default: on a terminal)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output; no progress")
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


# -- export (arc_dist/export.py) ----------------------------------------------------------------
def _cmd_export(args) -> int:
    from .export import ExportError, export_checkpoint, export_torchtitan

    kw = {"model_only": args.model_only, "storage_options": _storage_options(args.storage_option)}
    try:
        if args.to == "torchtitan":
            r = export_torchtitan(args.url, args.out or "checkpoint", **kw)
        else:
            r = export_checkpoint(args.url, args.out, to=args.to, **kw)
    except ExportError as e:
        raise _UsageError(str(e)) from e
    print(f"step_{r.step} -> {r.path} ({r.tensors} tensors, {_human(r.nbytes)})")
    return 0


@subcommand
def _register_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint as one torch.save or safetensors file, or for torchtitan",
        description="Reads a committed checkpoint (the one a resume loads, or URL/step_N) in one "
        "process, checks it against its manifest and writes one file that loads without "
        "arc-dist: torch.load(FILE, weights_only=True) or safetensors.torch.load_file(FILE); "
        "or, with --to torchtitan, a folder OUT/step-<N> a torchtitan job resumes from. "
        "Exit code 2 when the checkpoint is partial, damaged or missing.",
    )
    p.add_argument("url", help="checkpoint root, or one checkpoint: URL/step_N")
    p.add_argument(
        "--to",
        choices=("torch", "safetensors", "torchtitan"),
        default="torch",
        help="torchtitan: a DCP folder OUT/step-<N> in torchtitan's layout (default OUT: "
        "./checkpoint), docs/checkpoints.md",
    )
    p.add_argument(
        "--model-only",
        action="store_true",
        help="only the model's state_dict, under the model's own parameter names",
    )
    p.add_argument(
        "--out",
        metavar="FILE",
        help="output path or fsspec URL (default: step_<N>[-model].pt|.safetensors here)",
    )
    _add_storage_args(p)
    p.set_defaults(func=_cmd_export)


# -- report (arc_dist/observe/report.py) ----------------------------------------------------------------
@subcommand
def _register_report(sub) -> None:
    from .observe import report

    p = sub.add_parser(
        "report",
        help="summarise a run's event log; draw report.png and report.html",
        description="Reads RUN_DIR_OR_URL/events.jsonl (and the checkpoints there), prints faults "
        "by kind and rank, recoveries, steps and time lost, checkpoints and the mean time between "
        "failures, and writes report.png and report.html to --out (default: .). Drawing needs "
        "arc-dist[report]; --json without --out draws nothing.",
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


def _versions() -> str:
    """arc-dist's and torch's versions, read from package metadata: torch is not imported."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    try:
        torch = version("torch")
    except PackageNotFoundError:
        torch = "not installed"
    return f"arc-dist {__version__} (torch {torch}, Python {platform.python_version()})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arc-dist", description="arc-dist command line tools")
    parser.add_argument("--version", action="version", version=_versions())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _SUBCOMMANDS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)  # before any heavy import: --help, --version
    from .checkpoint.storage import storage_fault

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
