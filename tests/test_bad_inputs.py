"""Bad input to the checkpoint store and the ``arc-dist`` command line, one case at a time.

Damaged checkpoints, a checkpoint_dir that cannot work, storage that denies access, fills up
or goes away mid-save. Each case checks the same four things: a clear error that names the
path and the fix, no traceback from deep inside a library (the CLI prints one line; the
library raises its own exception, not a chained one), the exit code a launcher acts on (10
retry, 11 do not retry; 2 for the CLI's usage errors), and that nothing committed is lost.

Real files, a real tmpfs for the full disk, a real S3 server (moto) for the missing bucket and
the outage, and ``faultfs://`` (tests/faultfs.py) for permission and read errors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

import pytest

from arc_dist.checkpoint import CheckpointManager, CheckpointStorageError, TrainState, scan, verify
from arc_dist.checkpoint.manifest import MANIFEST_NAME, new_hasher
from arc_dist.checkpoint.storage import Storage
from arc_dist.cli import main as cli
from arc_dist.elastic.worker import _usage_error
from arc_dist.errors import CheckpointError, ExitCode
from tests import faultfs
from tests.checkpoint_helpers import make_model, make_optimizer, train_steps

pytestmark = pytest.mark.timeout(120)


class _Job:
    def __init__(self, width: int = 16) -> None:
        self.model = make_model(0, width)
        self.opt, self.sched = make_optimizer(self.model)

    def state(self) -> dict:
        return {"train": TrainState(self.model, self.opt, self.sched)}


def _manager(url, **kw) -> CheckpointManager:
    kw.setdefault("confirm_after", 0)
    kw.setdefault("retry_backoff", 0.01)
    kw.setdefault("max_retries", 1)
    return CheckpointManager(str(url), **kw)


def _save(url, steps=(1, 2), width: int = 16) -> _Job:
    job = _Job(width)
    with _manager(url, keep=5) as m:
        for s in steps:
            train_steps(job.model, job.opt, s - 1, s, job.sched)
            m.save(s, job.state(), blocking=True)
    return job


def _intact(url, steps) -> None:
    """Every step in ``steps`` is still committed and its files still match its manifest."""
    storage = Storage(str(url))
    infos = {i.step: i for i in scan(storage)}
    for s in steps:
        assert infos[s].committed and verify(storage, infos[s]) == [], f"step_{s} was lost"


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def _rewrite(step_dir, name: str, data: bytes) -> None:
    """Replace a file and keep the manifest consistent with it (only the content is wrong)."""
    (step_dir / name).write_bytes(data)
    doc = json.loads((step_dir / MANIFEST_NAME).read_text())
    h = new_hasher(doc["checksum_algorithm"])
    h.update(data)
    doc["files"][name] = {"size": len(data), "checksum": h.hexdigest()}
    (step_dir / MANIFEST_NAME).write_text(json.dumps(doc))


# -- damaged checkpoints: skipped for an older one, named by the CLI ----------------------------
def test_truncated_shard(tmp_path, capsys, caplog):
    ck = tmp_path / "ck"
    _save(ck)
    shard = ck / "step_2" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:50])
    rc, out, _ = _cli(capsys, "verify", ck)
    assert rc == 1 and "step_2: DAMAGED" in out and "__0_0.distcp has 50 bytes" in out
    assert "truncated" in out and "step_1: ok" in out
    with _manager(ck) as m:
        assert m.load(_Job().state()) == 1
    assert "step_2" in caplog.text and "truncated" in caplog.text
    _intact(ck, [1])


def test_manifest_that_is_not_json(tmp_path, capsys):
    ck = tmp_path / "ck"
    _save(ck)
    (ck / "step_2" / MANIFEST_NAME).write_text('{"format": "arc-dist-checkpoint", "step": 2,')
    rc, out, _ = _cli(capsys, "checkpoints", ck)
    assert rc == 0 and "unreadable" in out and "not valid JSON" in out
    rc, out, _ = _cli(capsys, "verify", ck / "step_2")
    assert rc == 1 and "not valid JSON" in out
    with _manager(ck) as m:
        assert m.load(_Job().state()) == 1
    _intact(ck, [1])


def test_manifest_that_names_missing_files(tmp_path, capsys):
    ck = tmp_path / "ck"
    _save(ck)
    path = ck / "step_2" / MANIFEST_NAME
    doc = json.loads(path.read_text())
    doc["files"]["__7_0.distcp"] = {"size": 10, "checksum": "00000000"}
    path.write_text(json.dumps(doc))
    rc, out, _ = _cli(capsys, "verify", ck)
    assert rc == 1 and "__7_0.distcp is missing" in out
    with _manager(ck) as m:
        assert m.load(_Job().state()) == 1
    _intact(ck, [1])


def test_metadata_from_another_model(tmp_path):
    ck, other = tmp_path / "ck", tmp_path / "other"
    _save(ck)
    _save(other, steps=(2,), width=32)
    _rewrite(ck / "step_2", ".metadata", (other / "step_2" / ".metadata").read_bytes())
    with _manager(ck) as m:  # its checksums match: only the content tells
        assert m.load(_Job().state()) == 1
    shutil.rmtree(ck / "step_1")
    with _manager(ck) as m, pytest.raises(CheckpointError) as err:
        m.load(_Job().state())
    msg = str(err.value)
    assert "step_2" in msg and "does not match the model" in msg and "[32, 8]" in msg
    assert "Fix: point checkpoint_dir at this model's checkpoints" in msg
    assert err.value.exit_code == ExitCode.UNRECOVERABLE


# -- a checkpoint_dir that cannot work: exit 11 at once -----------------------------------------
@pytest.mark.parametrize("below", [False, True])
def test_checkpoint_dir_that_is_a_file(tmp_path, capsys, below):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    url = blocker / "run" if below else blocker
    with pytest.raises(CheckpointStorageError) as err:
        _manager(url)
    assert err.value.exit_code == ExitCode.UNRECOVERABLE and err.value.__cause__ is None
    assert str(url) in str(err.value) and "is a file: pass a directory path" in str(err.value)
    rc, _, msg = _cli(capsys, "checkpoints", url)
    assert rc == 2 and str(url) in msg and "not a checkpoint directory" in msg
    assert blocker.read_text() == "not a directory"


def test_url_with_an_unknown_scheme(tmp_path, capsys):
    with pytest.raises(ValueError) as err:
        _manager("nosuch://bucket/run")
    assert "'nosuch://bucket/run'" in str(err.value) and "Install the filesystem's" in str(
        err.value
    )
    assert _usage_error(err.value)  # main_entry: arc-dist's own validation -> exit 11
    for cmd in ("checkpoints", "verify", "prune"):
        rc, _, msg = _cli(capsys, cmd, "nosuch://bucket/run", *(["--keep", "1"] * (cmd == "prune")))
        assert rc == 2 and "nosuch://bucket/run" in msg and "Protocol not known" in msg


def test_bucket_that_does_not_exist(s3_server, capsys):
    url = f"s3://no-bucket-{uuid.uuid4().hex[:8]}/run"
    with pytest.raises(CheckpointStorageError) as err:
        _manager(url, storage_options=s3_server.storage_options())
    assert err.value.exit_code == ExitCode.UNRECOVERABLE
    assert url in str(err.value) and "create the bucket" in str(err.value)
    assert s3_server.storage_options()["secret"] not in str(err.value)
    opts = [f"-o endpoint_url={s3_server.endpoint}", "-o key=k", "-o secret=s"]
    rc, _, msg = _cli(capsys, "checkpoints", url, *[x for o in opts for x in o.split(" ", 1)])
    assert rc == 2 and url in msg and "does not exist" in msg


# -- permissions denied (an fsspec filesystem that raises PermissionError) -----------------------
def test_permission_denied(tmp_path, capsys):
    ck = tmp_path / "ck"
    _save(ck)
    url = faultfs.url(ck)
    with pytest.raises(CheckpointStorageError) as err:  # at start: no restart can fix it
        _manager(url, storage_options={"write_error": "PermissionError"})
    assert err.value.exit_code == ExitCode.UNRECOVERABLE and str(ck) in str(err.value)
    assert "make checkpoint_dir writable by this user" in str(err.value)
    # a save denied later: the blocking save says so, the older checkpoints stay
    job = _Job()
    with _manager(url, storage_options={"write_error": "PermissionError", "match": "step_3"},
                  check_writable=False) as m:  # fmt: skip
        with pytest.raises(CheckpointStorageError) as err:
            m.save(3, job.state(), blocking=True)
    assert "Permission denied" in str(err.value) and "make checkpoint_dir writable" in str(
        err.value
    )
    assert m.stats()["checkpoint_retries"] == 0  # waiting does not fix a permission
    # reading denied: the CLI shows it as unreadable, not damaged
    opts = ["-o", "read_error=PermissionError", "-o", f"match={MANIFEST_NAME}"]
    rc, out, _ = _cli(capsys, "checkpoints", url, *opts)
    assert rc == 0 and "unreadable" in out and "PermissionError" in out
    rc, out, _ = _cli(
        capsys, "verify", url, "-o", "read_error=PermissionError", "-o", "match=distcp"
    )
    assert rc == 1 and "UNREADABLE" in out and "DAMAGED" not in out
    _intact(ck, [1, 2])


# -- a full disk ---------------------------------------------------------------------------------
@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)  # fmt: skip
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root in a privileged container): {p.stderr}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk(tiny_tmpfs, caplog):
    ck = tiny_tmpfs / "ck"
    job = _save(ck, steps=(1,))
    free = shutil.disk_usage(tiny_tmpfs).free
    with open(tiny_tmpfs / "filler", "wb") as f:  # leave less than a checkpoint's worth
        try:
            f.write(b"\0" * max(0, free - 2048))
        except OSError:
            pass
    with _manager(ck, check_writable=False) as m:
        with pytest.raises(CheckpointStorageError) as err:
            m.save(2, job.state(), blocking=True)
        msg = str(err.value)
        assert err.value.exit_code == ExitCode.RETRY and str(ck) in msg
        assert "No space left" in msg and "free space on the checkpoint file system" in msg
        m.save(3, job.state(), blocking=False)  # a background save: logged, training goes on
        m.wait()
        assert m.stats()["checkpoints_abandoned"] >= 1
    (tiny_tmpfs / "filler").unlink()
    _intact(ck, [1])
    with _manager(ck) as m:
        assert m.load(_Job().state()) == 1


# -- storage outage in the middle of a save -----------------------------------------------------
def test_outage_mid_save_local(tmp_path):
    ck = tmp_path / "ck"
    job = _save(ck)
    flaky = {"write_error": "ConnectionError", "match": ".distcp"}
    with _manager(faultfs.url(ck), storage_options=flaky, check_writable=False) as m:
        with pytest.raises(CheckpointStorageError) as err:
            m.save(3, job.state(), blocking=True)
    assert err.value.exit_code == ExitCode.RETRY and err.value.__cause__ is None
    assert "step_3" in str(err.value) and "Earlier checkpoints are untouched" in str(err.value)
    assert "check that the checkpoint storage is reachable" in str(err.value)
    _intact(ck, [1, 2])
    assert not any(i.committed for i in scan(Storage(str(ck))) if i.step == 3)


def test_outage_mid_save_s3(tmp_path):
    pytest.importorskip("moto")
    from tests.s3server import MotoServer

    server = MotoServer(str(tmp_path / "moto.log"))
    server.start()
    try:
        server.make_bucket("outage")
        url, opts = "s3://outage/run", server.storage_options()
        job = _Job()
        m = _manager(url, storage_options=opts, max_retries=0)
        m.save(1, job.state(), blocking=True)

        def stop_server(point, detail):  # the storage goes away while files are written
            if point == "write" and server.proc is not None:
                server.stop()

        m.fault_hook = stop_server
        with pytest.raises(CheckpointStorageError) as err:
            m.save(2, job.state(), blocking=True)
        m.fault_hook = None
        msg = str(err.value)
        assert err.value.exit_code == ExitCode.RETRY and url in msg and "step_2" in msg
        assert "Earlier checkpoints are untouched" in msg and opts["secret"] not in msg
        with pytest.raises(CheckpointStorageError) as err:  # resume while it is down: retry
            m.load(_Job().state())
        assert err.value.exit_code == ExitCode.RETRY and url in str(err.value)
        m.close()
    finally:
        server.stop()


def test_prune_refuses_a_missing_root_and_keep_zero(tmp_path, capsys):
    rc, _, msg = _cli(capsys, "prune", tmp_path / "missing", "--keep", "1")
    assert rc == 2 and "does not exist" in msg
    ck = tmp_path / "ck"
    _save(ck)
    rc, _, msg = _cli(capsys, "prune", ck, "--keep", "0")
    assert rc == 2 and "keep at least 1" in msg
    _intact(ck, [1, 2])
    assert os.path.isdir(ck)
