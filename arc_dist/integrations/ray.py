"""Arc under Ray Train v2: checkpoint location, storage check, and reporting to Ray.

Owns what a ``train_loop_per_worker`` run by ``ray.train.torch.TorchTrainer`` needs beyond the
plain loop. Ray is imported lazily: ``import arc_dist.ray`` works without it, and every helper
that needs Ray raises an ``ImportError`` naming ``pip install 'arc-dist[ray]'``.

Division of labour:

* numeric faults (NaN, spikes, divergence) are rolled back by ``Arc.step`` in place, on every
  worker, without Ray noticing;
* a dead worker process makes Ray restart the whole worker group
  (``RunConfig(failure_config=FailureConfig(max_failures=N))``); the restarted loop calls
  ``arc.resume()``, which loads the newest *healthy* arc-dist checkpoint from
  :func:`checkpoint_dir`. Ray's own checkpoint registry is not the source of truth: a checkpoint
  reported just before a crash may be missing from it, and it knows nothing about health.

Inside the loop (every worker)::

    import arc_dist.ray as arc_ray

    def train_loop_per_worker(config):
        model = ray.train.torch.prepare_model(build_model())   # DDP
        arc = Arc(model, opt, checkpoint_dir=arc_ray.checkpoint_dir(), config=...)
        arc.resume()                                  # after a Ray restart: newest healthy
        while arc.global_step < steps:
            ...
            action = arc.step(loss)
            ...
            if arc.global_step % 20 == 0:
                arc_ray.report(arc, {"loss": action.loss}, action=action)   # every worker

On the driver, before ``trainer.fit()``: ``arc_ray.check_storage(run_config)``.

:func:`report` attaches a ``ray.train.Checkpoint`` that *points at* the newest committed
arc-dist checkpoint (no copy), so ``Result.checkpoint`` and ``Result.best_checkpoints`` list
it. Leave ``CheckpointConfig(num_to_keep=None)`` (the default): retention is arc-dist's
(``ArcConfig.keep_checkpoints``, which never deletes the newest healthy checkpoint); Ray's would
delete checkpoint directories that arc-dist still counts on.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..controller import Action, Arc

log = logging.getLogger("arc_dist")

INSTALL_HINT = "pip install 'arc-dist[ray]'"
#: the folder under ``<storage_path>/<name>`` that holds arc-dist's checkpoints
ARC_SUBDIR = "arc"

# pyarrow filesystem type -> fsspec protocol, for rebuilding a URL from Ray's storage context
_PYARROW_SCHEMES = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs", "abfs": "abfs"}

# per Arc, without adding attributes to the user's object: the newest checkpoint step reported
# to Ray, and the Arcs whose checkpoints Ray cannot list (warned once, then not tried again)
_reported: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_no_listing: weakref.WeakSet = weakref.WeakSet()


def _require_ray():
    """Import Ray Train; a clear ``ImportError`` when it is missing."""
    try:
        import ray
        import ray.train
    except ImportError as e:
        raise ImportError(
            f"arc_dist.ray needs Ray Train ({e}); install it with: {INSTALL_HINT}"
        ) from e
    return ray


def _train_context():
    ray = _require_ray()
    try:
        return ray.train.get_context()
    except RuntimeError as e:
        raise RuntimeError(
            "arc_dist.ray: not inside a Ray Train worker (call this from the "
            "train_loop_per_worker that TorchTrainer runs), or pass storage_path= and name= "
            f"explicitly ({e})"
        ) from None


def _storage(ctx: Any = None) -> Any:
    ctx = ctx if ctx is not None else _train_context()
    try:
        return ctx.get_storage()
    except NotImplementedError:
        raise ValueError(
            "arc_dist.ray: Ray Train's local mode (ScalingConfig(num_workers=0)) has no storage "
            "context; pass checkpoint_dir(storage_path=...)"
        ) from None


def storage_url(storage: Any) -> str:
    """An fsspec URL for ``RunConfig(storage_path)`` from Ray's ``StorageContext``.

    Ray keeps the path prefix-stripped plus a pyarrow filesystem; arc-dist writes through
    fsspec, so the scheme is put back. A custom ``RunConfig(storage_filesystem=...)`` that is
    not an fsspec wrapper cannot be translated: pass ``storage_path=`` to
    :func:`checkpoint_dir` then.
    """
    fs, path = storage.storage_filesystem, storage.storage_fs_path
    kind = fs.type_name
    if kind == "local":
        return path
    scheme = _PYARROW_SCHEMES.get(kind)
    if scheme is None and kind.startswith("py::fsspec+"):
        protocol = getattr(getattr(fs, "handler", None), "fs", None)
        protocol = getattr(protocol, "protocol", None)
        if isinstance(protocol, (tuple, list)):
            protocol = protocol[0]
        scheme = protocol or kind.split("+", 1)[1]
    if scheme is None:
        raise ValueError(
            f"arc_dist.ray: cannot derive an fsspec URL from Ray's storage filesystem {kind!r} "
            f"(path {path!r}); pass checkpoint_dir(storage_path=...) with the same location as "
            "an fsspec URL, e.g. 's3://bucket/runs'"
        )
    return f"{scheme}://{path.lstrip('/')}" if scheme != "file" else path


def checkpoint_dir(storage_path: str | None = None, name: str | None = None) -> str:
    """Where this run's arc-dist checkpoints live: ``<storage_path>/<name>/arc``.

    Both default to the run's ``RunConfig(storage_path=..., name=...)``, read from
    ``ray.train.get_context()`` (so call it inside ``train_loop_per_worker``). Keeping the
    checkpoints inside Ray's experiment folder lets :func:`report` list them in Ray's results,
    and lets a restarted worker group (or a new ``fit()`` with the same name) find them.

    Give ``storage_path`` when ``RunConfig(storage_filesystem=...)`` is a custom pyarrow
    filesystem, or when Arc needs a different URL for the same place (an S3-compatible
    endpoint: then pass the endpoint to ``Arc(storage_options=...)``).
    """
    if storage_path is None or name is None:
        ctx = _train_context()
        if name is None:
            name = ctx.get_experiment_name()
        if storage_path is None:
            storage_path = storage_url(_storage(ctx))
    if not isinstance(storage_path, str) or not storage_path:
        raise TypeError(
            f"checkpoint_dir(storage_path=...) must be a non-empty str, got {storage_path!r}"
        )
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"checkpoint_dir(name={name!r}) must be a non-empty run name without '/'")
    return f"{storage_path.rstrip('/')}/{name}/{ARC_SUBDIR}"


def check_storage(
    target: Any,
    *,
    storage_options: dict | None = None,
    timeout: float = 60.0,
) -> str:
    """Driver side, before ``trainer.fit()``: fail fast when the storage cannot be written.

    ``target`` is a ``ray.train.RunConfig`` (its ``storage_path``/``name`` are checked, i.e. the
    folder :func:`checkpoint_dir` will give the workers) or a checkpoint URL. A probe file is
    written and removed through fsspec, which is what arc-dist uses, within ``timeout``
    seconds. Without this, a bad path surfaces only in the workers, where each of Ray's
    ``max_failures`` restarts would hit it again.

    Returns the URL that was checked. Raises
    :class:`~arc_dist.checkpoint.CheckpointStorageError` naming the URL, the cause and the fix.
    On a multi-node cluster a local path must be on a file system every node mounts; this check
    runs on the driver's node only.
    """
    from ..checkpoint import CheckpointStorageError, Storage
    from ..checkpoint.storage import redact

    if isinstance(target, str):
        url = target
    else:
        storage_path = getattr(target, "storage_path", None)
        name = getattr(target, "name", None)
        if storage_path is None or name is None:
            raise TypeError(
                "check_storage(target) needs a ray.train.RunConfig (with storage_path and name) "
                f"or a URL string, got {type(target).__name__}"
            )
        if getattr(target, "storage_filesystem", None) is not None:
            return _check_pyarrow(target, timeout)
        url = checkpoint_dir(str(storage_path), name)

    def probe() -> None:
        Storage(url, storage_options).probe_writable()

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="arc-storage-check")
    try:
        pool.submit(probe).result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        raise CheckpointStorageError(
            f"arc_dist: storage {redact(url)!r} did not answer within {timeout:.0f}s; check the "
            "endpoint, network and credentials (storage_options) before starting training"
        ) from None
    except (ValueError, TypeError):
        raise
    except Exception as e:  # OSError, PermissionError, botocore errors, ...
        raise CheckpointStorageError(
            f"arc_dist: storage {redact(url)!r} is not writable: {type(e).__name__}: {e}. Fix: "
            "use a path this user can write (on a multi-node cluster: shared storage every node "
            "reaches, e.g. s3://bucket/runs or an NFS mount) and check storage_options"
        ) from e
    finally:
        pool.shutdown(wait=False)
    return url


def _check_pyarrow(run_config: Any, timeout: float) -> str:
    """The probe through a custom ``RunConfig(storage_filesystem=...)``."""
    from ..checkpoint import CheckpointStorageError

    fs = run_config.storage_filesystem
    root = f"{str(run_config.storage_path).rstrip('/')}/{run_config.name}/{ARC_SUBDIR}"
    probe = f"{root}/.arc_probe_{os.getpid()}"

    def run() -> None:
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"arc-dist write probe")
        fs.delete_file(probe)

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="arc-storage-check")
    try:
        pool.submit(run).result(timeout=timeout)
    except Exception as e:
        raise CheckpointStorageError(
            f"arc_dist: storage {root!r} on {fs.type_name} is not writable: {type(e).__name__}: {e}"
        ) from e
    finally:
        pool.shutdown(wait=False)
    return root


def _scalar(value: Any) -> Any:
    """A Ray-serializable metric value (Ray refuses tensors), or None to drop it."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return value
    item = getattr(value, "item", None)  # a one-element tensor or numpy scalar
    if item is not None and getattr(value, "numel", lambda: 1)() == 1:
        return item()
    return None


def metrics(arc: Arc, extra: dict | None = None, *, action: Action | None = None) -> dict:
    """What :func:`report` sends: ``step``, ``arc/<stat>`` for each scalar of ``arc.stats()``,
    ``arc/<field>`` of ``action`` (loss, grad_norm, status, reason, rolled_back) and ``extra``.
    """
    out: dict[str, Any] = {"step": arc.global_step}
    for key, value in arc.stats().items():
        value = _scalar(value)
        if value is not None:
            out[f"arc/{key}"] = value
    if action is not None:
        out.update(
            {
                "arc/loss": action.loss,
                "arc/grad_norm": action.grad_norm,
                "arc/status": action.status,
                "arc/reason": action.reason or "",
                "arc/rolled_back": action.rolled_back,
            }
        )
    for key, value in (extra or {}).items():
        scalar = _scalar(value)
        if scalar is None and value is not None:
            raise TypeError(
                f"arc_dist.ray.report: metric {key!r} is a {type(value).__name__}; report "
                "numbers or strings (e.g. loss.item())"
            )
        out[key] = scalar
    return out


def _warn_once(arc: Arc, why: str) -> None:
    """Rank 0: Ray's listing will not show this run's checkpoints; say why, once per Arc."""
    if arc not in _no_listing:
        _no_listing.add(arc)
        log.warning(
            "arc_dist.ray.report: reporting metrics only, no checkpoints, to Ray: %s (arc.resume() "
            "is unaffected)",
            why,
        )


def _new_checkpoint(arc: Arc):
    """Rank 0: a ``ray.train.Checkpoint`` for arc-dist's newest committed step, if not reported."""
    stats = arc.stats()
    step = stats.get("last_committed_step")
    if step is None or arc.checkpoint_dir is None or _reported.get(arc) == step:
        return None, None
    from ..checkpoint.manifest import MANIFEST_NAME, step_dir_name

    ray = _require_ray()
    storage = _storage()
    experiment_url = f"{storage_url(storage)}/{storage.experiment_dir_name}"
    arc_dir = str(arc.checkpoint_dir).rstrip("/")
    if arc_dir.startswith("file://"):
        arc_dir = arc_dir[len("file://") :]
    if not (arc_dir == experiment_url or arc_dir.startswith(experiment_url + "/")):
        _warn_once(
            arc,
            f"checkpoint_dir {arc_dir!r} is outside Ray's run folder {experiment_url!r}; use "
            "arc_dist.ray.checkpoint_dir() to change that",
        )
        return None, None
    path = f"{storage.experiment_fs_path}{arc_dir[len(experiment_url) :]}/{step_dir_name(step)}"
    import pyarrow.fs

    fs = storage.storage_filesystem
    if fs.get_file_info(f"{path}/{MANIFEST_NAME}").type == pyarrow.fs.FileType.NotFound:
        return None, None  # uncommitted again meanwhile (a rollback past it)
    _reported[arc] = step
    return ray.train.Checkpoint(path=path, filesystem=fs), step


def report(
    arc: Arc,
    extra: dict | None = None,
    *,
    action: Action | None = None,
    checkpoint: bool = True,
) -> dict:
    """Every worker, at the same steps: ``ray.train.report`` of :func:`metrics`.

    When arc-dist committed a checkpoint since the last call (``arc.stats()
    ["last_committed_step"]``), rank 0 attaches a ``ray.train.Checkpoint`` pointing at it
    (``CheckpointUploadMode.NO_UPLOAD``: nothing is copied), and the metrics get
    ``arc/checkpoint_step``. The checkpoint must be inside Ray's run folder, as
    :func:`checkpoint_dir` puts it.

    ``ray.train.report`` is a barrier across workers: call this on every worker the same number
    of times (e.g. when ``arc.global_step % N == 0`` after a step; ``Action`` is identical on
    every rank, so a rollback does not desynchronize the calls). Returns the metrics sent.
    """
    ray = _require_ray()
    out = metrics(arc, extra, action=action)
    ckpt = None
    no_upload = getattr(getattr(ray.train, "CheckpointUploadMode", None), "NO_UPLOAD", None)
    if checkpoint and arc.rank == 0 and arc not in _no_listing:
        if no_upload is None:
            _warn_once(
                arc, f"Ray {ray.__version__} cannot register a checkpoint without copying it"
            )
        else:
            try:
                ckpt, step = _new_checkpoint(arc)
            except ValueError as e:  # a storage filesystem without an fsspec URL
                _warn_once(arc, str(e))
            if ckpt is not None:
                out["arc/checkpoint_step"] = step
    if ckpt is None:
        ray.train.report(out)
    else:
        ray.train.report(
            out,
            checkpoint=ckpt,
            checkpoint_upload_mode=no_upload,
        )
    return out
