"""The ``arc-dist`` command line's own behaviour: ``--version``, ``verify`` progress and exit codes,
``report --json`` without matplotlib."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import arc_dist
from arc_dist.checkpoint.manifest import MANIFEST_NAME

pytestmark = pytest.mark.timeout(120)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, **kw
    )


def test_version_names_both_versions_without_importing_torch():
    from importlib.metadata import version

    r = _python(
        "import sys\nfrom arc_dist.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit as e:\n    code = e.code\n"
        "print('exit', code, 'torch imported' if 'torch' in sys.modules else 'no torch')"
    )
    assert r.returncode == 0, r.stderr
    first, last = r.stdout.strip().splitlines()
    assert first.startswith(f"arc-dist {arc_dist.__version__} (torch {version('torch')}")
    assert last == "exit 0 no torch"


def _checkpoint(tmp_path) -> str:
    from tests.test_export import _saved_run

    return _saved_run(tmp_path)[0]


def _cli(*args: str, tty: bool = False) -> tuple[int, str, str]:
    """``arc-dist ARGS`` in this process; with ``tty`` its stderr is a pseudo-terminal."""
    import contextlib
    import io
    import pty

    from arc_dist.cli import main

    out, err = io.StringIO(), io.StringIO()
    leader = follower = None
    if tty:
        leader, follower = pty.openpty()
        err = os.fdopen(follower, "w")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(list(args))
            except SystemExit as e:  # --help
                rc = e.code
    finally:
        if tty:
            err.close()
    if not tty:
        return rc, out.getvalue(), err.getvalue()
    text = b""
    with contextlib.suppress(OSError):  # EIO once the closed terminal is drained
        while chunk := os.read(leader, 4096):
            text += chunk
    os.close(leader)
    return rc, out.getvalue(), text.decode()


def test_verify_progress_on_a_terminal_or_when_asked_and_never_with_json(tmp_path):
    import json

    url = _checkpoint(tmp_path)
    rc, out, err = _cli("verify", url)  # stderr is a pipe: silent
    assert rc == 0 and err == "" and "step_6: ok" in out
    rc, out, err = _cli("verify", url, "--progress")
    lines = err.strip().splitlines()
    assert rc == 0 and lines and all(line.startswith("verify: ") for line in lines)
    assert lines[-1].startswith("verify: 6/6 files, ") and lines[-1].endswith("/s"), lines
    rc, out, err = _cli("verify", url, tty=True)
    assert rc == 0 and "\r" in err and "\x1b[K" in err and "verify: 6/6 files" in err, err
    rc, out, err = _cli("verify", url, "--json", tty=True)
    assert rc == 0 and err == ""
    assert [(r["step"], r["status"]) for r in json.loads(out)] == [(3, "ok"), (6, "ok")]


def test_verify_exit_codes_match_its_help(tmp_path):
    url = _checkpoint(tmp_path)
    rc, out, _ = _cli("verify", "--help")
    assert "1: a checkpoint is damaged or unreadable" in " ".join(out.split())
    step3 = tmp_path / "ck" / "step_3"
    shard = next(p for p in step3.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:-1])
    assert _cli("verify", url)[0] == 1
    rc, out, _ = _cli("verify", url, "--json")
    assert rc == 1 and '"damaged"' in out
    os.remove(step3 / MANIFEST_NAME)  # step_3 is now a partial save, not a checkpoint
    rc, out, _ = _cli("verify", url)
    assert rc == 0 and "step_3: partial" in out and "step_6: ok" in out
    assert _cli("verify", f"{url}/step_3")[0] == 1
    rc, _, err = _cli("verify", f"{url}/step_9")
    assert rc == 2 and "step_9: not found" in err
    rc, _, err = _cli("verify", str(tmp_path))  # no checkpoints there
    assert rc == 2
