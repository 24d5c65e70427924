"""Checkpoints at world size 1: format, commit, confirmation, fallback, failures, the CLI.

Real files in ``tmp_path`` (and ``memory://``), real DCP, no mocks; faults are injected through
the manager's ``fault_hook`` (a raise or a block inside DCP's write path) or made by damaging the
files on disk. Multi-rank behaviour is in test_checkpoint_dist.py, S3 in test_checkpoint_s3.py.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest
import torch

from arc_dist.checkpoint import CheckpointManager, CheckpointStorageError, TrainState, scan, verify
from arc_dist.checkpoint.catalog import CheckpointInfo
from arc_dist.checkpoint.dcp_io import SafeReader, _no_zip_crc
from arc_dist.checkpoint.manifest import (
    CONFIRMED_NAME,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    ManifestError,
    make_manifest,
    new_hasher,
)
from arc_dist.checkpoint.retention import plan_retention
from arc_dist.cli import main as cli
from arc_dist.errors import CheckpointError
from tests import faultfs
from tests._dist import run_ranks
from tests.checkpoint_helpers import (
    Position,
    assert_state_equal,
    make_model,
    make_optimizer,
    reference_state,
    train_steps,
)

pytestmark = pytest.mark.timeout(60)


class Run:
    """A model, optimizer, scheduler, scaler and user object trained with the tiny workload."""

    def __init__(self, width: int = 16, seed: int = 0) -> None:
        self.model = make_model(seed, width)
        self.opt, self.sched = make_optimizer(self.model)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        self.pos = Position()
        self.step = 0

    def train(self, n: int) -> None:
        train_steps(self.model, self.opt, self.step, self.step + n, self.sched)
        self.step += n
        self.pos.value = self.step
        self.pos.seen.append(self.step)

    def app_state(self) -> dict:
        return {
            "train": TrainState(self.model, self.opt, self.sched, self.scaler),
            "data": self.pos,
        }


def manager(url, **kw) -> CheckpointManager:
    kw.setdefault("confirm_after", 0)
    kw.setdefault("retry_backoff", 0.05)
    return CheckpointManager(str(url), **kw)


# -- pure parts -----------------------------------------------------------------------------
def test_manifest_roundtrip_and_rejects_garbage():
    m = make_manifest(
        7,
        2,
        {".metadata": FileEntry(10, "ab"), "__0_0.distcp": FileEntry(5, "cd")},
        checksum_algorithm="crc32",
        config_digest="abc",
        verdict={"status": "healthy", "loss": float("nan")},
    )
    back = Manifest.from_json(m.to_json())
    assert (back.step, back.world_size, back.config_digest, back.total_bytes) == (7, 2, "abc", 15)
    assert back.files == m.files and back.verdict == {"status": "healthy", "loss": "nan"}
    assert "torch" in back.versions and json.loads(m.to_json())["format"] == "arc-dist-checkpoint"
    for bad in (
        b"{not json",
        b"[]",
        b'{"format": "other"}',
        json.dumps({"format": "arc-dist-checkpoint"}).encode(),
    ):
        with pytest.raises(ManifestError):
            Manifest.from_json(bad)
    # parsed strictly: standard JSON only, one meaning per key, files inside the directory
    good = m.to_json().decode()
    for bad, why in (
        (good.replace('"step": 7', '"step": NaN'), "NaN is not JSON"),
        (good.replace('"step": 7', '"step": 7, "step": 8'), "duplicate keys"),
        (good.replace('"__0_0.distcp"', '"../../etc/passwd"'), "outside its directory"),
        (good.replace('"size": 5', '"size": -5'), "sized < 0"),
    ):
        with pytest.raises(ManifestError, match=why):
            Manifest.from_json(bad.encode())


def _info(step: int, state: str) -> CheckpointInfo:
    files = {"x": 1}
    if state in ("committed", "confirmed"):
        files[MANIFEST_NAME] = 1
    if state == "confirmed":
        files[CONFIRMED_NAME] = 1
    return CheckpointInfo(step, f"/r/step_{step}", files)


def test_retention_policy():
    infos = [
        _info(10, "confirmed"),
        _info(20, "committed"),
        _info(25, "partial"),
        _info(30, "committed"),
        _info(40, "committed"),
        _info(50, "partial"),
    ]
    # keep 2 newest committed (30, 40) + newest confirmed (10); partial 25 is older than the newest
    # commit, partial 50 may still be written: kept
    assert [i.step for i in plan_retention(infos, 2)] == [20, 25]
    assert [i.step for i in plan_retention(infos, 1)] == [20, 25, 30]
    assert [i.step for i in plan_retention(infos, 1, protect={25})] == [20, 30]
    assert plan_retention([_info(5, "partial")], 1) == []  # nothing committed: touch nothing
    with pytest.raises(ValueError, match="keep"):
        plan_retention(infos, 0)


# -- save and load --------------------------------------------------------------------------
def test_roundtrip_restores_every_part(tmp_path):
    run = Run()
    run.train(7)
    run.scaler.scale(torch.ones(()))  # the scale tensor exists after the first scale()
    run.scaler.update(new_scale=256.0)
    mgr = manager(tmp_path / "ck")
    mgr.save(7, run.app_state(), verdict={"status": "healthy"}, blocking=True)
    after = (torch.rand(3), random.random(), np.random.rand())  # RNG draws right after the save
    mgr.close()

    step_dir = tmp_path / "ck" / "step_7"
    names = set(os.listdir(step_dir))
    assert {".metadata", "__0_0.distcp", MANIFEST_NAME, CONFIRMED_NAME} <= names
    doc = json.loads((step_dir / MANIFEST_NAME).read_text())
    assert (doc["step"], doc["world_size"], doc["verdict"]) == (7, 1, {"status": "healthy"})
    assert doc["checksum_algorithm"] == "xxh3_64"  # xxhash is installed in the dev environment
    for name, entry in doc["files"].items():  # checksums computed while writing match a re-read
        data = (step_dir / name).read_bytes()
        h = new_hasher(doc["checksum_algorithm"])
        h.update(data)
        assert entry == {"size": len(data), "checksum": h.hexdigest()}

    fresh = Run()
    mgr2 = manager(tmp_path / "ck")
    assert mgr2.load(fresh.app_state()) == 7
    assert_state_equal(fresh.model.state_dict(), reference_state(7))
    assert (
        fresh.sched.last_epoch == 7
        and fresh.opt.param_groups[0]["lr"] == run.opt.param_groups[0]["lr"]
    )
    assert fresh.scaler.get_scale() == 256.0
    assert (fresh.pos.value, fresh.pos.seen) == (7, [7])
    assert (
        torch.equal(torch.rand(3), after[0])
        and random.random() == after[1]
        and np.random.rand() == after[2]
    )
    # the optimizer state came back too: both continue identically
    fresh.step = fresh.pos.value
    run.train(3)
    fresh.train(3)
    assert_state_equal(fresh.model.state_dict(), run.model.state_dict())
    mgr2.close()


def test_tensor_records_skip_torch_zip_crc(tmp_path):
    """torch.load never checks torch.save's zip CRC32 and the manifest checksums every byte, so
    the save does not compute it; torch.save elsewhere keeps it."""
    run = Run()
    run.train(2)
    with manager(tmp_path / "ck") as mgr:
        mgr.save(2, run.app_state(), blocking=True)
    assert torch.serialization.get_crc32_options()
    data = (tmp_path / "ck" / "step_2" / "__0_0.distcp").read_bytes()
    # every record of the zip archives DCP appended: central directory entry, CRC32 at offset 16
    crcs = [data[i + 16 : i + 20] for i in range(len(data)) if data.startswith(b"PK\x01\x02", i)]
    assert len(crcs) > 10 and set(crcs) == {bytes(4)}
    fresh = Run()
    with manager(tmp_path / "ck") as mgr:
        assert mgr.load(fresh.app_state()) == 2
    assert_state_equal(fresh.model.state_dict(), run.model.state_dict())


def test_memory_url_roundtrip():
    run = Run()
    run.train(3)
    url = f"memory://arc-test-{os.getpid()}-{id(run)}"
    with manager(url) as mgr:
        mgr.save(3, run.app_state(), blocking=False)
        mgr.wait()
        assert mgr.stats()["last_committed_step"] == 3
        fresh = Run()
        assert mgr.load(fresh.app_state()) == 3
        assert_state_equal(fresh.model.state_dict(), run.model.state_dict())


def test_empty_dir_loads_nothing(tmp_path):
    (tmp_path / "ck" / "step_5").mkdir(parents=True)  # a crashed save: not a checkpoint
    (tmp_path / "ck" / "step_5" / "__0_0.distcp").write_bytes(b"partial")
    with manager(tmp_path / "ck") as mgr:
        assert mgr.load(Run().app_state()) is None


def test_confirmation_and_rollback(tmp_path):
    run = Run()
    mgr = manager(tmp_path / "ck", confirm_after=3)
    mgr.save(0, run.app_state(), blocking=True)
    for step in range(0, 3):  # steps 1 and 2 count, step 0 (the save step itself) does not
        mgr.on_healthy_step(step)
    mgr.wait()
    assert not (tmp_path / "ck" / "step_0" / CONFIRMED_NAME).exists()
    mgr.on_healthy_step(3)
    mgr.wait()
    assert (tmp_path / "ck" / "step_0" / CONFIRMED_NAME).exists()
    assert mgr.stats()["last_confirmed_step"] == 0

    run.train(10)
    mgr.save(10, run.app_state(), blocking=True)
    mgr.on_healthy_step(11)
    mgr.on_rollback(5)  # a failure: the state at step 10 may already be bad
    for step in range(6, 30):
        mgr.on_healthy_step(step)
    mgr.wait()
    assert not (tmp_path / "ck" / "step_10" / MANIFEST_NAME).exists()
    assert [(i.step, i.state) for i in scan(mgr.storage)] == [(0, "confirmed")]
    assert mgr.stats()["checkpoints_rejected"] == 1 and mgr.stats()["last_confirmed_step"] == 0
    mgr.close()


def test_rollback_during_async_save_prevents_commit(tmp_path):
    run = Run()
    mgr = manager(tmp_path / "ck", confirm_after=2)
    release = threading.Event()
    mgr.fault_hook = lambda point, detail: release.wait(20) if point == "write" else None
    mgr.save(10, run.app_state(), blocking=False)
    mgr.on_rollback(4)  # while the save is still writing
    release.set()
    mgr.wait()
    assert scan(mgr.storage) == [] and mgr.stats()["checkpoints"] == 0
    assert mgr.stats()["checkpoints_rejected"] == 1
    mgr.close()


def test_resume_prefers_healthy_and_warns_without(tmp_path, caplog):
    run = Run()
    mgr = manager(tmp_path / "ck", confirm_after=2)
    mgr.save(0, run.app_state(), blocking=True, verdict={"status": "warning"})
    run.train(4)
    mgr.save(4, run.app_state(), blocking=True, verdict={"status": "warning"})
    mgr.close()
    with (
        caplog.at_level(logging.WARNING, logger="arc_dist"),
        manager(tmp_path / "ck", confirm_after=2) as m2,
    ):
        fresh = Run()
        assert m2.load(fresh.app_state()) == 4
    assert "no checkpoint" in caplog.text and "healthy verdict or confirmed" in caplog.text
    # confirm step 0: it is trusted now, the newer step 4 (saved under a warning) is not
    from arc_dist.checkpoint.manifest import confirmation_json

    (tmp_path / "ck" / "step_0" / CONFIRMED_NAME).write_bytes(confirmation_json(0, 2, 2))
    with manager(tmp_path / "ck", confirm_after=2) as m3:
        fresh = Run()
        assert m3.load(fresh.app_state()) == 0
        m3.wait()
    assert_state_equal(fresh.model.state_dict(), reference_state(0))
    # nothing is deleted at a resume: step 4 goes when training saves step 4 again, or by retention
    assert [(i.step, i.state) for i in scan(m3.storage)] == [(0, "confirmed"), (4, "committed")]


def test_resave_same_step_replaces_old_files(tmp_path):
    run = Run()
    run.train(2)
    with manager(tmp_path / "ck") as mgr:
        mgr.save(2, run.app_state(), blocking=True)
    stale = tmp_path / "ck" / "step_2" / "__3_0.distcp"  # e.g. left by a larger world size
    stale.write_bytes(b"old")
    other = Run(seed=1)
    other.train(2)
    with manager(tmp_path / "ck") as mgr:
        mgr.save(2, other.app_state(), blocking=False)
        mgr.wait()
        fresh = Run()
        assert mgr.load(fresh.app_state()) == 2
    assert_state_equal(fresh.model.state_dict(), other.model.state_dict())
    assert not stale.exists()


def test_retention_keeps_newest_and_confirmed(tmp_path):
    run = Run()
    with manager(tmp_path / "ck", keep=2, confirm_after=100) as mgr:
        for step in (0, 1, 2, 3):
            mgr.save(step, run.app_state(), blocking=True)
        mgr.wait()  # retention runs right after each commit, queued behind the save
        assert [i.step for i in scan(mgr.storage)] == [2, 3]
    (tmp_path / "ck" / "step_1").mkdir()  # partial dirs: one older than the newest commit, ...
    (tmp_path / "ck" / "step_9").mkdir()  # ... one newer (it may still be being written)
    with manager(tmp_path / "ck", keep=1, confirm_after=0) as mgr:
        mgr.save(4, run.app_state(), blocking=True)
        mgr.save(5, run.app_state(), blocking=True)
    infos = scan(mgr.storage)
    assert [(i.step, i.state) for i in infos] == [(5, "confirmed"), (9, "partial")]


# -- integrity and fallback -----------------------------------------------------------------
def _damage(step_dir, how: str) -> None:
    shard = step_dir / "__0_0.distcp"
    if how == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    elif how == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    elif how == "delete":
        shard.unlink()
    elif how == "manifest":
        (step_dir / MANIFEST_NAME).write_text("{garbled")


def _steps_5_and_10(root) -> CheckpointManager:
    """Checkpoints of the tiny workload at steps 5 and 10 under ``root``; the closed manager."""
    run = Run()
    run.train(5)
    with manager(root, keep=5) as mgr:
        mgr.save(5, run.app_state(), blocking=True)
        run.train(5)
        mgr.save(10, run.app_state(), blocking=True)
    return mgr


@pytest.mark.parametrize("how", ["flip", "truncate", "delete", "manifest"])
def test_damaged_checkpoint_falls_back(tmp_path, how, caplog):
    mgr = _steps_5_and_10(tmp_path / "ck")
    _damage(tmp_path / "ck" / "step_10", how)
    info = next(i for i in scan(mgr.storage) if i.step == 10)
    assert verify(mgr.storage, info)  # the damage is found by verify ...
    fresh = Run()
    with caplog.at_level(logging.WARNING, logger="arc_dist"), manager(tmp_path / "ck") as m2:
        assert m2.load(fresh.app_state()) == 5  # ... and by load, which falls back
    assert_state_equal(fresh.model.state_dict(), reference_state(5))
    assert "step_10" in caplog.text and "unusable" in caplog.text


@pytest.mark.parametrize(
    "error,match,verify_on_load",
    [
        ("EndpointConnectionError", ".distcp", True),  # an object store outage: not an OSError
        ("ConnectionError", ".metadata", True),
        ("PermissionError", MANIFEST_NAME, True),  # expired credentials on the first read
        ("TimeoutError", ".distcp", False),  # DCP's own read of the data
    ],
)
def test_unreadable_checkpoint_is_retried_not_skipped(tmp_path, error, match, verify_on_load):
    """Listing works but reading fails: exit 10 with the storage error, nothing skipped."""
    _steps_5_and_10(tmp_path / "ck")
    flaky = {"read_error": error, "match": match}
    fresh = Run()
    with pytest.raises(CheckpointStorageError) as err:
        with manager(faultfs.url(tmp_path / "ck"), storage_options=flaky,
                     verify_on_load=verify_on_load) as m2:  # fmt: skip
            m2.load(fresh.app_state())
    assert err.value.exit_code == 10
    assert "step_10" in str(err.value) and "could not be read" in str(err.value)
    assert f"{error}: " in str(err.value)  # the storage error itself
    assert "step_5" not in str(err.value)  # not thrown away for an older one
    # the storage answers again: the same checkpoint loads
    with manager(faultfs.url(tmp_path / "ck")) as m3:
        assert m3.load(fresh.app_state()) == 10
    assert_state_equal(fresh.model.state_dict(), reference_state(10))


def test_no_usable_checkpoint_names_each(tmp_path):
    run = Run()
    with manager(tmp_path / "ck", keep=5, checksum="crc32") as mgr:  # the fallback algorithm
        for step in (1, 2):
            mgr.save(step, run.app_state(), blocking=True)
    _damage(tmp_path / "ck" / "step_2", "flip")
    _damage(tmp_path / "ck" / "step_1", "truncate")
    with manager(tmp_path / "ck") as m2, pytest.raises(CheckpointError) as err:
        m2.load(Run().app_state())
    msg = str(err.value)
    assert "step_2" in msg and "crc32 check" in msg and "step_1" in msg and "truncated" in msg


def test_other_model_is_rejected_with_key_names(tmp_path):
    run = Run()
    with manager(tmp_path / "ck") as mgr:
        mgr.save(1, run.app_state(), blocking=True)
    wide = Run(width=32)
    with manager(tmp_path / "ck") as m2, pytest.raises(CheckpointError) as err:
        m2.load(wide.app_state())
    assert "shape mismatch" in str(err.value) and "train.model.0.weight" in str(err.value)
    assert "[16, 8]" in str(err.value) and "[32, 8]" in str(err.value)
    deeper = Run()
    deeper.model.append(torch.nn.Linear(2, 2))
    deeper.opt, deeper.sched = make_optimizer(deeper.model)
    with manager(tmp_path / "ck") as m3, pytest.raises(CheckpointError) as err:
        m3.load(deeper.app_state())
    assert "missing keys" in str(err.value) and "train.model.5.weight" in str(err.value)
    shallow = Run()
    del shallow.model[4]
    del shallow.model[3]
    shallow.opt, shallow.sched = make_optimizer(shallow.model)
    with manager(tmp_path / "ck") as m4, pytest.raises(CheckpointError) as err:
        m4.load(shallow.app_state())
    assert "unexpected keys" in str(err.value) and "train.model.4.weight" in str(err.value)


def _dotted_global_pickle(module: str, name: str, arg: str) -> bytes:
    """Protocol 4: ``STACK_GLOBAL(module, name)(arg)``; a dotted name resolves attributes."""

    def text(t: str) -> bytes:
        return b"\x8c" + bytes([len(t.encode())]) + t.encode()

    return b"\x80\x04" + text(module) + text(name) + b"\x93" + text(arg) + b"\x85R."


@pytest.mark.parametrize("how", ["reduce", "dotted"])
def test_metadata_is_never_unpickled_freely(tmp_path, how):
    run = Run()
    with manager(tmp_path / "ck") as mgr:
        mgr.save(1, run.app_state(), blocking=True)
    step_dir = tmp_path / "ck" / "step_1"
    marker = tmp_path / "pwned"
    if how == "reduce":
        evil = pickle.dumps(_Evil(str(marker)))
    else:  # an allowed module, then attribute lookups out of it: os.system
        evil = _dotted_global_pickle(
            "torch.distributed.checkpoint.filesystem", "os.system", f"touch {marker}"
        )
    (step_dir / ".metadata").write_bytes(evil)
    # whoever can write .metadata can rewrite the manifest too: checksums do not stop it
    doc = json.loads((step_dir / MANIFEST_NAME).read_text())
    h = new_hasher(doc["checksum_algorithm"])
    h.update(evil)
    doc["files"][".metadata"] = {"size": len(evil), "checksum": h.hexdigest()}
    (step_dir / MANIFEST_NAME).write_text(json.dumps(doc))
    with manager(tmp_path / "ck") as m2, pytest.raises(CheckpointError, match="not DCP metadata"):
        m2.load(Run().app_state())
    with pytest.raises(pickle.UnpicklingError, match="not DCP metadata"):
        SafeReader(str(step_dir), storage_options={}).read_metadata()
    assert not marker.exists()


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# -- async policy and failures --------------------------------------------------------------
def test_save_due_while_writing_is_skipped_and_counted(tmp_path):
    run = Run()
    mgr = manager(tmp_path / "ck")
    release = threading.Event()
    mgr.fault_hook = lambda point, detail: release.wait(20) if point == "write" else None
    mgr.save(1, run.app_state(), blocking=False)  # returns while the write is held
    run.train(1)
    mgr.save(2, run.app_state(), blocking=False)
    assert mgr.stats()["checkpoints_skipped"] == 1 and mgr.stats()["checkpoints"] == 0
    release.set()
    mgr.close()  # waits for the write in flight
    assert mgr.stats()["checkpoints"] == 1
    assert [(i.step, i.state) for i in scan(mgr.storage)] == [(1, "confirmed")]
    fresh = Run()
    with manager(tmp_path / "ck") as m2:
        assert m2.load(fresh.app_state()) == 1
    assert_state_equal(fresh.model.state_dict(), reference_state(0))  # staged before train(1)


def test_transient_write_failure_is_retried(tmp_path, caplog):
    run = Run()
    mgr = manager(tmp_path / "ck", keep=5)
    mgr.save(1, run.app_state(), blocking=True)

    def flaky(point, detail):  # the first two attempts fail (each may have several writers)
        if point == "write" and mgr.stats()["checkpoint_failures"] < 2:
            raise OSError(5, "Input/output error (injected)")

    mgr.fault_hook = flaky
    run.train(2)
    with caplog.at_level(logging.WARNING, logger="arc_dist"):
        mgr.save(2, run.app_state(), blocking=False)
        mgr.wait()
    s = mgr.stats()
    assert (s["checkpoint_failures"], s["checkpoint_retries"], s["checkpoints"]) == (2, 2, 2)
    assert "retrying" in caplog.text
    assert all(not verify(mgr.storage, i) for i in scan(mgr.storage))
    mgr.close()


def test_failed_save_leaves_older_checkpoints_and_raises_when_blocking(tmp_path, caplog):
    run = Run()
    mgr = manager(tmp_path / "ck", keep=5, max_retries=1)
    mgr.save(1, run.app_state(), blocking=True)

    def broken(point, detail):
        if point == "before_manifest":
            raise OSError(28, "No space left on device (injected)")

    mgr.fault_hook = broken
    with caplog.at_level(logging.ERROR, logger="arc_dist"):
        mgr.save(2, run.app_state(), blocking=False)  # background: logged and counted
        mgr.wait()
    assert mgr.stats()["checkpoints_abandoned"] == 1 and "free space" in caplog.text
    with pytest.raises(CheckpointStorageError, match="No space left") as err:
        mgr.save(3, run.app_state(), blocking=True)
    assert "Earlier checkpoints are untouched" in str(err.value)
    mgr.close()
    assert [(i.step, i.state) for i in scan(mgr.storage)] == [(1, "confirmed")]
    assert verify(mgr.storage, scan(mgr.storage)[0]) == []


def _unwritable_worker(rank, world, root):
    """In a child process: a user that cannot write ``root/ck`` (root ignores file modes)."""
    warm = CheckpointManager(f"memory://warm-{os.getpid()}", confirm_after=0)  # import everything
    warm.save(0, Run().app_state(), blocking=True)  # now: the interpreter's own files may not be
    warm.load(Run().app_state())  # readable by the unprivileged user
    warm.close()
    if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)
    run = Run()
    out = {}
    try:
        CheckpointManager(os.path.join(root, "ck"))
    except CheckpointStorageError as e:
        out["init"] = str(e)
    mgr = CheckpointManager(
        os.path.join(root, "ck"), check_writable=False, confirm_after=0, retry_backoff=0.01
    )
    mgr.save(2, run.app_state(), blocking=False)  # background failure: training goes on
    mgr.wait()
    out["stats"] = mgr.stats()
    try:
        mgr.save(3, run.app_state(), blocking=True)
    except CheckpointStorageError as e:
        out["blocking"] = str(e)
    fresh = Run()
    out["loaded"] = mgr.load(fresh.app_state())  # reading still works
    mgr.close()
    return out


def test_permission_denied_is_a_clear_error():
    # a world-readable directory of our own, so an unprivileged child can read but not write it
    root = tempfile.mkdtemp(prefix="arc-perm-")
    try:
        os.chmod(root, 0o755)
        with manager(os.path.join(root, "ck")) as mgr:
            mgr.save(1, Run().app_state(), blocking=True)
        for dirpath, dirnames, filenames in os.walk(root):
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), 0o755)
            for f in filenames:
                os.chmod(os.path.join(dirpath, f), 0o644)
        os.chmod(os.path.join(root, "ck"), 0o555)
        (out,) = run_ranks(_unwritable_worker, 1, root, distributed=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert "Permission denied" in out["init"] and "writable" in out["init"]
    s = out["stats"]
    assert s["checkpoints_abandoned"] == 1 and s["checkpoint_retries"] == 0  # not retried: futile
    assert (
        "Permission denied" in out["blocking"] and "make checkpoint_dir writable" in out["blocking"]
    )
    assert out["loaded"] == 1


def _full_disk_worker(rank, world, url, limit):
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    records = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger("arc_dist").addHandler(handler)
    run = Run(width=256)
    mgr = CheckpointManager(url, confirm_after=0, max_retries=1, retry_backoff=0.01)
    mgr.save(1, run.app_state(), blocking=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    run.train(3)  # training goes on while the save fails in the background
    mgr.save(4, run.app_state(), blocking=False)
    run.train(3)
    mgr.wait()
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    fresh = Run(width=256)
    step = mgr.load(fresh.app_state())
    mgr.close()
    return mgr.stats(), step, run.step, records


def test_file_size_limit_fails_save_not_training(tmp_path):
    stats, step, trained, errors = run_ranks(
        _full_disk_worker, 1, str(tmp_path / "ck"), 64 * 1024, distributed=False
    )[0]
    assert len(errors) == 1 and "File too large" in errors[0] and "ulimit" in errors[0]
    assert stats["checkpoints_abandoned"] == 1 and stats["checkpoint_failures"] == 2
    assert step == 1 and trained == 6
    assert [
        i.step for i in scan(CheckpointManager(str(tmp_path / "ck")).storage) if i.committed
    ] == [1]


# -- command line ---------------------------------------------------------------------------
def test_cli_checkpoints_verify_prune(tmp_path, capsys):
    run = Run()
    url = str(tmp_path / "ck")
    with manager(url, keep=5, confirm_after=100) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, run.app_state(), blocking=True)
    (tmp_path / "ck" / "step_0").mkdir()
    assert cli(["checkpoints", url]) == 0
    out = capsys.readouterr().out
    assert "partial" in out and out.count("committed") == 3
    assert cli(["checkpoints", url, "--json"]) == 0
    assert [d["step"] for d in json.loads(capsys.readouterr().out)] == [0, 1, 2, 3]
    assert cli(["verify", url]) == 0
    _damage(tmp_path / "ck" / "step_2", "flip")
    assert cli(["verify", url]) == 1
    out = capsys.readouterr().out
    assert "step_2: DAMAGED" in out and "step_3: ok" in out
    assert cli(["verify", f"{url}/step_3"]) == 0
    assert cli(["verify", f"{url}/step_0"]) == 1  # partial: not a checkpoint
    assert cli(["verify", f"{url}/step_9"]) == 2
    assert cli(["prune", url, "--keep", "1", "--dry-run"]) == 0
    assert len(scan(mgr.storage)) == 4
    assert cli(["prune", url, "--keep", "1"]) == 0
    assert [i.step for i in scan(mgr.storage)] == [3]
    assert cli(["prune", url, "--keep", "0"]) == 2


def test_console_script_exit_codes(tmp_path):
    """The installed ``arc-dist`` entry point, in a fresh process."""
    exe = os.path.join(os.path.dirname(sys.executable), "arc-dist")
    if not os.path.exists(exe):
        pytest.skip("arc-dist is not installed in this environment (pip install -e .)")
    url = str(tmp_path / "ck")
    with manager(url) as mgr:
        mgr.save(1, Run().app_state(), blocking=True)
    _damage(tmp_path / "ck" / "step_1", "truncate")
    out = subprocess.run([exe, "verify", url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "step_1: DAMAGED" in out.stdout and "truncated" in out.stdout


def test_turning_the_zip_crc_off_in_the_writer_thread_leaves_other_threads_alone():
    """A background checkpoint write turns torch's zip CRC32 off for its own streams only: the
    training thread's own ``torch.save`` keeps it (torch keeps the option per thread)."""
    inside, leave, seen = threading.Event(), threading.Event(), []

    def writer():
        with _no_zip_crc():
            seen.append(torch.serialization.get_crc32_options())
            inside.set()
            leave.wait(30)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert inside.wait(30)
        assert seen == [False] and torch.serialization.get_crc32_options() is True
    finally:
        leave.set()
        t.join(30)
    assert torch.serialization.get_crc32_options() is True
