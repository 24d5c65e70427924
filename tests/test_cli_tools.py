"""The ``arc-dist`` command line's own behaviour: ``--version``, ``verify`` progress and exit codes,
``report --json`` without matplotlib."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import arc_dist

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
