"""Fast recovery under the launcher: the survivor of a crashed peer exits without walking its heap,
and ``--warm-start`` forks workers from a per-node zygote with torch already imported, behind a
torch-free shim that torchrun supervises like any worker (arc_dist/elastic/zygote.py).

Real torchrun, real SIGKILL and SIGTERM; every test has its own TMPDIR and log folder, a timeout,
and kills whatever is left. No timing assertions: the times are benchmarks/recovery.py's.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from arc_dist.errors import ExitCode

from ._launchproc import clean_env


@pytest.mark.timeout(120)
def test_a_failing_exit_freezes_the_heap_before_the_teardown(tmp_path):
    # an atexit handler registered before main() runs after main_entry's (LIFO): the heap is
    # frozen by then, so the teardown's cycle collection skips torch's objects
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent("""
        import atexit, gc
        from arc_dist.launch import main_entry
        atexit.register(lambda: print("frozen", gc.get_freeze_count() > 0, flush=True))

        @main_entry
        def main():
            raise RuntimeError("peer gone")

        main()
    """))  # fmt: skip
    env = clean_env(tmp_path, TORCHELASTIC_ERROR_FILE=str(tmp_path / "error.json"))
    p = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=100)  # fmt: skip
    assert p.returncode == ExitCode.RETRY, p.stderr[-2000:]
    assert "frozen True" in p.stdout, (p.stdout, p.stderr[-2000:])
