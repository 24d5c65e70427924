"""``arc-dist report RUN_DIR_OR_URL``: what went wrong in a run, where, and what it cost.

Owns reading a run (the event log of ``events.py`` and, when present, the checkpoint listing),
the summary (:func:`summarize`: faults by kind and rank, recoveries, steps and wall time lost,
checkpoints, mean time between failures), its text table, and the figure: ``report.png`` (loss
and gradient norm over steps, with faults, rollbacks, restarts and checkpoints marked) and
``report.html`` (the same PNG embedded, the summary and the list of notable events).

matplotlib is imported only to draw (``pip install 'arc-dist[report]'``); the summary needs
nothing beyond the standard library, and ``--json`` without ``--out`` draws nothing. Usage::

    arc-dist report s3://bucket/run-7 --out ./report -o endpoint_url=http://127.0.0.1:9000
    python -m arc_dist.observe.report /shared/run-7
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import sys
import time
from collections import Counter, defaultdict
from typing import Any

from .events import read_events

#: figure size in pixels: ``FIG_INCHES * DPI``
FIG_INCHES = (12.0, 7.0)
DPI = 100

_NOTABLE = {
    "failure",
    "warning",
    "forecast",
    "rollback",
    "escalation",
    "recovered",
    "unrecoverable",
    "restart",
    "load",
    "straggler",
    "checkpoint_failure",
    "checkpoint_reject",
    "checkpoint_skip",
}


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def list_checkpoints(url: str, storage_options: dict | None = None) -> list[dict]:
    """The checkpoints under ``url`` as ``{"step", "state", "bytes"}`` (empty when there are none
    or the checkpoint package cannot list them)."""
    try:
        from ..checkpoint.catalog import scan
        from ..checkpoint.storage import Storage

        infos = scan(Storage(url, storage_options), read_manifests=False)
    except Exception:  # noqa: BLE001 - the report works from the event log alone
        return []
    return [{"step": i.step, "state": i.state, "bytes": i.nbytes} for i in infos]


def summarize(events: list[dict], checkpoints: list[dict] | None = None) -> dict:
    """Counts and costs of a run from its records (oldest first)."""
    kinds = Counter(r.get("kind") for r in events)
    failures = [r for r in events if r.get("kind") == "failure"]
    by_reason: dict[str, Counter] = defaultdict(Counter)
    for r in failures:
        for rank in r.get("ranks") or ["?"]:
            by_reason[r.get("reason") or "?"][str(rank)] += 1
    warnings_by_reason = Counter(
        r.get("reason") or "?" for r in events if r.get("kind") == "warning"
    )
    restarts = [r for r in events if r.get("kind") == "restart"]
    starts = [r for r in events if r.get("kind") == "start"]
    crash_restarts = [r for r in restarts if not (r.get("values") or {}).get("clean")]

    def cost(recs, key):
        return (
            sum(_num((r.get("cost") or {}).get(key)) for r in recs if r.get("cost")) if recs else 0
        )

    rollbacks = [r for r in events if r.get("kind") == "rollback"]
    times = [_num(r.get("time")) for r in events if math.isfinite(_num(r.get("time")))]
    wall = (max(times) - min(times)) if times else 0.0
    steps = [r["step"] for r in events if isinstance(r.get("step"), int)]
    n_fail = len(failures) + len(crash_restarts)
    commits = [r for r in events if r.get("kind") == "checkpoint_commit"]
    rates = [_num((r.get("values") or {}).get("MB_per_s")) for r in commits]
    rates = [x for x in rates if math.isfinite(x)]
    ckpt = {
        "started": kinds["checkpoint_start"],
        "committed": len(commits),
        "confirmed": kinds["checkpoint_confirm"],
        "failed_attempts": kinds["checkpoint_failure"],
        "skipped": kinds["checkpoint_skip"],
        "rejected": kinds["checkpoint_reject"],
        "mean_MB_per_s": sum(rates) / len(rates) if rates else None,
    }
    if checkpoints:
        ckpt["on_storage"] = dict(Counter(c["state"] for c in checkpoints))
        ckpt["newest_on_storage"] = max(c["step"] for c in checkpoints)
    runs = sorted({r.get("run") for r in events if r.get("run")})
    return {
        "records": len(events),
        "runs": runs,
        "processes": len(starts),
        "restarts": len(restarts) if restarts else max(0, len(starts) - 1),
        "final_step": steps[-1] if steps else None,
        "max_step": max(steps) if steps else None,
        "wall_s": wall,
        "failures": len(failures),
        "faults_by_reason": {k: dict(v) for k, v in sorted(by_reason.items())},
        "failures_by_rank": dict(
            sorted(Counter(str(x) for r in failures for x in (r.get("ranks") or ["?"])).items())
        ),
        "warnings": kinds["warning"],
        "warnings_by_reason": dict(warnings_by_reason),
        "forecasts": kinds["forecast"],
        "rollbacks": len(rollbacks),
        "escalations": kinds["escalation"],
        "recovered": kinds["recovered"],
        "unrecoverable": kinds["unrecoverable"],
        "stragglers": sum(
            1 for r in events if r.get("kind") == "straggler" and r.get("reason") == "slow_rank"
        ),
        "steps_lost": int(cost(rollbacks, "steps_lost") + cost(restarts, "steps_lost")),
        "steps_lost_rollbacks": int(cost(rollbacks, "steps_lost")),
        "steps_lost_restarts": int(cost(restarts, "steps_lost")),
        "seconds_lost": cost(rollbacks, "seconds") + cost(restarts, "seconds"),
        "seconds_lost_rollbacks": cost(rollbacks, "seconds"),
        "seconds_lost_restarts": cost(restarts, "seconds"),
        "mtbf_s": wall / n_fail if n_fail else None,
        "checkpoints": ckpt,
    }


def _fmt_s(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def format_summary(s: dict) -> str:
    """The summary as a plain-text table."""
    rows: list[tuple[str, str]] = [
        ("run", ", ".join(s["runs"]) or "-"),
        ("steps (final / max)", f"{s['final_step']} / {s['max_step']}"),
        ("wall time", _fmt_s(s["wall_s"])),
        ("processes / restarts", f"{s['processes']} / {s['restarts']}"),
        ("failures", str(s["failures"])),
        ("warnings", str(s["warnings"])),
        ("instability forecasts", str(s.get("forecasts", 0))),
        ("rollbacks / escalations", f"{s['rollbacks']} / {s['escalations']}"),
        ("recovered / unrecoverable", f"{s['recovered']} / {s['unrecoverable']}"),
        (
            "steps lost (rollbacks + restarts)",
            f"{s['steps_lost']} ({s['steps_lost_rollbacks']} + {s['steps_lost_restarts']})",
        ),
        (
            "wall time lost (rollbacks + restarts)",
            f"{_fmt_s(s['seconds_lost'])} ({_fmt_s(s['seconds_lost_rollbacks'])} + {_fmt_s(s['seconds_lost_restarts'])})",
        ),
        (
            "mean time between failures",
            _fmt_s(s["mtbf_s"]) if s["mtbf_s"] is not None else "no failures",
        ),
    ]
    c = s["checkpoints"]
    rows.append(
        (
            "checkpoints (committed / confirmed)",
            f"{c['committed']} / {c['confirmed']}"
            + (f", {c['failed_attempts']} failed attempts" if c["failed_attempts"] else "")
            + (f", {c['skipped']} skipped" if c["skipped"] else "")
            + (f", {c['rejected']} rejected" if c["rejected"] else ""),
        )
    )
    if c.get("mean_MB_per_s") is not None:
        rows.append(("checkpoint write speed (mean)", f"{c['mean_MB_per_s']:.1f} MB/s"))
    if "on_storage" in c:
        states = ", ".join(f"{v} {k}" for k, v in sorted(c["on_storage"].items()))
        rows.append(("checkpoints on storage", f"{states} (newest step {c['newest_on_storage']})"))
    width = max(len(k) for k, _ in rows)
    out = ["Summary", "-" * (width + 30)]
    out += [f"{k:<{width}}  {v}" for k, v in rows]
    if s["faults_by_reason"]:
        ranks = sorted(
            {r for v in s["faults_by_reason"].values() for r in v}, key=lambda x: (len(x), x)
        )
        w = max(len("fault"), *(len(k) for k in s["faults_by_reason"]))
        out += ["", "Faults by kind and rank"]
        out.append(
            f"{'fault':<{w}}  " + "  ".join(f"{'rank ' + r:>7}" for r in ranks) + f"  {'total':>5}"
        )
        for reason, counts in s["faults_by_reason"].items():
            cells = "  ".join(f"{counts.get(r, 0):>7}" for r in ranks)
            out.append(f"{reason:<{w}}  {cells}  {sum(counts.values()):>5}")
    return "\n".join(out)


def plot(events: list[dict], path: str, *, title: str = "arc-dist run") -> None:
    """Draw the run to ``path`` (PNG): loss (top) and gradient norm (bottom) over steps."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "arc-dist report draws with matplotlib: pip install 'arc-dist[report]'"
        ) from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_grad) = plt.subplots(
        2, 1, figsize=FIG_INCHES, dpi=DPI, sharex=True, gridspec_kw={"height_ratios": [3, 1.4]}
    )
    # the curve is split where training went back (rollback, restart) so it never draws backwards;
    # each process (restart count) gets its own colour, since a restart redoes steps
    segments: list[tuple[int, list[tuple[int, float, float]]]] = [(0, [])]
    for r in events:
        kind = r.get("kind")
        if kind in ("rollback", "restart", "start"):
            if segments[-1][1]:
                segments.append((0, []))
        elif kind == "metrics" and isinstance(r.get("step"), int):
            if not segments[-1][1]:
                segments[-1] = (int(r.get("restart") or 0), segments[-1][1])
            v = r.get("values") or {}
            segments[-1][1].append((r["step"], _num(v.get("loss")), _num(v.get("grad_norm"))))
    colors = ["tab:blue", "tab:cyan", "tab:olive", "tab:brown", "tab:pink"]
    seen: set[int] = set()
    for restart, seg in segments:
        color = colors[restart % len(colors)]
        label = None
        if restart not in seen:
            label = "loss" if restart == 0 else f"loss after restart {restart}"
            seen.add(restart)
        pts = [(x, lo) for x, lo, _ in seg if math.isfinite(lo)]
        if pts:
            ax_loss.plot(*zip(*pts), color=color, lw=1.2, label=label)
        pts = [(x, g) for x, _, g in seg if math.isfinite(g) and g > 0]
        if pts:
            ax_grad.plot(*zip(*pts), color=color, lw=1.0)
    ax_grad.set_yscale("log")

    def marks(kind, **style):
        xs = [r["step"] for r in events if r.get("kind") == kind and isinstance(r.get("step"), int)]
        return xs, style

    labelled: set[str] = set()

    def vlines(xs, label, **style):
        for x in xs:
            for ax in (ax_loss, ax_grad):
                ax.axvline(
                    x, label=label if (ax is ax_loss and label not in labelled) else None, **style
                )
            labelled.add(label)

    fails = [r for r in events if r.get("kind") == "failure" and isinstance(r.get("step"), int)]
    vlines([r["step"] for r in fails], "failure", color="tab:red", lw=1.2, alpha=0.8)
    for r in fails:
        ranks = ",".join(str(x) for x in r.get("ranks") or [])
        ax_loss.annotate(
            f"{r.get('reason')} r{ranks}",
            (r["step"], 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=7,
            color="tab:red",
        )
    xs, _ = marks("warning")
    vlines(xs, "warning", color="gold", lw=1.0, ls=":")
    xs, _ = marks("forecast")
    vlines(xs, "instability forecast", color="tab:olive", lw=1.0, ls="-.")
    xs, _ = marks("restart")
    vlines(xs, "restart", color="tab:purple", lw=2.0, ls="--")
    # a rollback: an arrow from the failed step back to the restored one
    for r in events:
        if r.get("kind") == "rollback" and isinstance(r.get("step"), int):
            failed = (r.get("values") or {}).get("failed_step", r["step"])
            ax_loss.annotate(
                "",
                xy=(r["step"], 0.06),
                xytext=(failed, 0.06),
                xycoords=("data", "axes fraction"),
                arrowprops=dict(arrowstyle="->", color="tab:orange", lw=1.5),
            )
    if any(r.get("kind") == "rollback" for r in events):
        ax_loss.plot([], [], color="tab:orange", lw=1.5, label="rollback (failed -> restored)")
    for kind, marker, color, label in (
        ("checkpoint_commit", "^", "tab:green", "checkpoint committed"),
        ("checkpoint_failure", "v", "black", "checkpoint failed"),
    ):
        xs, _ = marks(kind)
        if xs:
            ax_loss.scatter(xs, [0.02] * len(xs), transform=ax_loss.get_xaxis_transform(),
                            marker=marker, color=color, s=30, zorder=3, label=label)  # fmt: skip
    ax_loss.set_ylabel("loss")
    ax_grad.set_ylabel("grad norm")
    ax_grad.set_xlabel("global step")
    ax_loss.set_title(title)
    ax_loss.grid(alpha=0.3)
    ax_grad.grid(alpha=0.3)
    ax_loss.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the size stays FIG_INCHES * DPI
    plt.close(fig)


def _describe(r: dict) -> str:
    parts = [r.get("kind", "?")]
    if r.get("reason"):
        parts.append(str(r["reason"]))
    if r.get("ranks"):
        parts.append("ranks " + ",".join(str(x) for x in r["ranks"]))
    cost = r.get("cost") or {}
    if cost.get("steps_lost") or cost.get("seconds"):
        parts.append(f"lost {cost.get('steps_lost', 0)} steps, {_num(cost.get('seconds')):.2f} s")
    return " ".join(parts)


def write_html(
    summary: dict, events: list[dict], png_path: str, html_path: str, *, title: str
) -> None:
    with open(png_path, "rb") as f:
        png = base64.b64encode(f.read()).decode()
    notable = [r for r in events if r.get("kind") in _NOTABLE]
    rows = "\n".join(
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>".format(
            html.escape(time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(_num(r.get("time")) or 0))),
            html.escape(str(r.get("step"))),
            html.escape(str(r.get("restart"))),
            html.escape(_describe(r)),
        )
        for r in notable
    )
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} pre{{background:#f6f6f6;padding:1em}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:2px 8px;font-size:13px}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
<img alt="loss and gradient norm over steps, with faults, rollbacks, restarts and checkpoints marked"
 src="data:image/png;base64,{png}">
<h2>Summary</h2>
<pre>{html.escape(format_summary(summary))}</pre>
<h2>Notable events ({len(notable)})</h2>
<table><tr><th>time (UTC)</th><th>step</th><th>restart</th><th>event</th></tr>
{rows}
</table>
<h2>Summary (JSON)</h2>
<pre>{html.escape(json.dumps(summary, indent=1, default=str))}</pre>
</body></html>
"""
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(doc)


def report(
    url: str, out_dir: str | None = None, storage_options: dict | None = None, *, draw: bool = True
) -> dict:
    """Read the run under ``url``, write ``report.png`` and ``report.html`` to ``out_dir``
    (default: the current directory) and return the summary with the paths it wrote.
    ``draw=False``: the summary only (no matplotlib, no files)."""
    events = read_events(url, storage_options)
    if not events:
        raise ValueError(
            f"no event log in {url!r}: expected events.jsonl (or events.jsonl.d/) written by "
            "Arc(checkpoint_dir=...) or Arc(log_dir=...)"
        )
    summary = summarize(events, list_checkpoints(url, storage_options))
    if not draw:
        return summary
    out_dir = out_dir or "."
    os.makedirs(out_dir, exist_ok=True)
    png, page = os.path.join(out_dir, "report.png"), os.path.join(out_dir, "report.html")
    title = f"arc-dist run: {url}"
    plot(events, png, title=title)
    write_html(summary, events, png, page, title=title)
    summary["png"], summary["html"] = png, page
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "url",
        metavar="RUN_DIR_OR_URL",
        help="the run's log_dir / checkpoint_dir (path or fsspec URL)",
    )
    p.add_argument("--out", metavar="DIR", help="where report.png and report.html go (default: .)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the summary as JSON instead of a table; draws nothing (needs no matplotlib) "
        "unless --out is given",
    )


def run(args: argparse.Namespace, storage_options: dict | None = None) -> int:
    """The ``report`` command; exit code 0, or 2 when there is no log or matplotlib is missing."""
    try:
        draw = not args.json or args.out is not None
        summary = report(args.url, args.out, storage_options, draw=draw)
    except (ValueError, ImportError) as e:
        print(f"arc-dist report: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
    else:
        print(format_summary(summary))
        print(f"\nwrote {summary['png']} and {summary['html']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m arc_dist.observe.report", description=__doc__.split("\n")[0]
    )
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
