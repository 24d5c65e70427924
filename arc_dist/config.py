"""``ArcConfig``: every knob of the controller, validated at construction.

Thresholds are relative to the run's own robust statistics (median and upper tail over a window
of applied steps), so they carry over between models and loss scales; the defaults are chosen so
that healthy runs never roll back and rarely skip (benchmarks/false_positives.py measures it
over several models, seeds, LRs and batch sizes down to 1; docs/policy.md).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import config_io


def _check(cond: bool, name: str, value: object, fix: str) -> None:
    if not cond:
        raise ValueError(f"ArcConfig.{name}={value!r} is invalid: {fix}")


@dataclass(kw_only=True, slots=True)
class Thresholds:
    """When a signal counts as an outlier: ``*_warn`` reports it, ``*_fail`` skips its update.

    Spike tests need both a z-score above ``zscore_*`` and a ratio ``x / reference`` above
    ``*_ratio_*``, the reference being the larger of the window's median and its last few
    values. Losses and gradient norms are positive, so the z-score is taken in log space against
    the window's upper tail: ``(log x - median) / spread`` with ``spread = (q90 - median) / 1.28``
    (never below the MAD's), so heavy-tailed per-batch losses need a proportionally larger jump.
    The z-score alone would fire on low-noise runs, a ratio alone on noisy or trending ones
    (policy.py). An outlier's update is skipped, not rolled back: the state is intact without it.
    """

    #: healthy steps observed before spike tests use the window statistics
    warmup_steps: int = 20
    #: healthy steps kept for the running median/MAD
    window: int = 100
    zscore_warn: float = 6.0
    zscore_fail: float = 12.0
    loss_ratio_warn: float = 1.5
    loss_ratio_fail: float = 2.0
    grad_ratio_warn: float = 10.0
    grad_ratio_fail: float = 50.0
    #: before warm-up ends, a grad norm this many times the median so far skips its update
    grad_ratio_warmup: float = 1000.0
    #: a learning rate this many times what the attached scheduler says, or ranks whose LRs
    #: differ by this factor, is a spike (without a scheduler the loop's LR is its schedule)
    lr_ratio_fail: float = 2.0
    #: weight norm changed by more than this factor between two deep checks
    weight_ratio_fail: float = 2.0
    #: optimizer-state norm (over parameters with state at both checks) changed by more than
    #: this factor between deep checks
    state_ratio_fail: float = 100.0

    def __post_init__(self) -> None:
        _check(self.warmup_steps >= 3, "thresholds.warmup_steps", self.warmup_steps, "use >= 3")
        _check(
            self.window >= self.warmup_steps,
            "thresholds.window",
            self.window,
            f"use >= warmup_steps ({self.warmup_steps})",
        )
        for name in ("zscore_warn", "zscore_fail"):
            v = getattr(self, name)
            _check(math.isfinite(v) and v > 0, f"thresholds.{name}", v, "use a finite value > 0")
        for name in (
            "loss_ratio_warn",
            "loss_ratio_fail",
            "grad_ratio_warn",
            "grad_ratio_fail",
            "grad_ratio_warmup",
            "lr_ratio_fail",
            "weight_ratio_fail",
            "state_ratio_fail",
        ):
            v = getattr(self, name)
            _check(math.isfinite(v) and v > 1, f"thresholds.{name}", v, "use a finite value > 1")
        _check(
            self.zscore_fail >= self.zscore_warn,
            "thresholds.zscore_fail",
            self.zscore_fail,
            f"use >= zscore_warn ({self.zscore_warn})",
        )


@dataclass(kw_only=True, slots=True)
class EarlyWarning:
    """A forecast of instability from the gradient norm's growth (forecast.py), off by default.

    It does not meet the early-warning target (docs/early_warning.md): on organic failures it
    warns a few steps ahead of a divergence already under way, not 100 steps ahead. A forecast
    never skips or rolls back an update: the step's ``Action`` says ``warning`` with reason
    ``instability_forecast``, Arc pins a snapshot of the next verified healthy state, and with
    ``lr_factor`` it lowers the LR as the backoff does, restored the same way.
    """

    #: turn forecasts on
    enabled: bool = False
    #: the score that fires: the short-term log gradient norm above its long-term level, in
    #: natural-log units (1.0: about 2.7 times). Healthy runs of the corpus peaked at 0.48
    threshold: float = 1.0
    #: applied steps fed to the rule before it may fire
    min_steps: int = 3
    #: steps after a forecast before another one may fire
    cooldown: int = 50
    #: multiply every param group's LR by this factor on a forecast (0 < f <= 1), undone like
    #: the rollback backoff (``lr_restore``, ``recovery_steps``); None or 1: leave the LR alone.
    #: Forecasts also fire on healthy runs whose gradient norm grows fast (an LR warm-up, tiny
    #: batches, unfrozen layers: docs/early_warning.md), so set it only for steady runs
    lr_factor: float | None = None

    def __post_init__(self) -> None:
        _check(
            isinstance(self.enabled, bool),
            "early_warning.enabled",
            self.enabled,
            "use True or False",
        )
        _check(
            isinstance(self.threshold, (int, float))
            and not isinstance(self.threshold, bool)
            and math.isfinite(self.threshold)
            and self.threshold > 0,
            "early_warning.threshold",
            self.threshold,
            "use a finite value > 0 (log units; 1.0 is the evaluated default)",
        )
        for name, low in (("min_steps", 1), ("cooldown", 0)):
            v = getattr(self, name)
            _check(
                isinstance(v, int) and not isinstance(v, bool) and v >= low,
                f"early_warning.{name}",
                v,
                f"use an integer >= {low}",
            )
        _check(
            self.lr_factor is None
            or (
                isinstance(self.lr_factor, (int, float))
                and not isinstance(self.lr_factor, bool)
                and 0 < self.lr_factor <= 1
            ),
            "early_warning.lr_factor",
            self.lr_factor,
            "use a factor in (0, 1], e.g. 0.5; None or 1 leaves the LR alone",
        )


@dataclass(kw_only=True, slots=True)
class ArcConfig:
    """Configuration of :class:`arc_dist.Arc`. Every field has a default."""

    #: steps between in-memory snapshots (rollback targets); only healthy states are kept
    snapshot_every: int = 50
    #: snapshots kept in host memory; escalation rolls back to older ones
    keep_snapshots: int = 2
    #: steps between durable checkpoints to ``checkpoint_dir``; 0 = only on ``save()``
    checkpoint_every: int = 0
    #: durable checkpoints kept; the newest healthy, the newest confirmed and the one resumed from
    #: are never deleted (docs/checkpoints.md)
    keep_checkpoints: int = 3
    #: healthy steps after a checkpoint before it counts as confirmed healthy (a fallback kept
    #: until a newer one is confirmed); warns unless <= checkpoint_every * keep_checkpoints
    confirm_after: int = 20
    #: write periodic checkpoints in the background (a writer thread; a checkpoint at a snapshot
    #: step writes the snapshot's host copies instead of copying the state again)
    async_checkpoint: bool = True
    #: keep the newest healthy snapshots in node-local memory too (``local_dir``), so a group
    #: restarted on the same nodes resumes from at most ``snapshot_every`` steps back without
    #: remote storage (docs/elastic.md). None: on when ``checkpoint_dir`` is set and the job has
    #: a run id (``TORCHELASTIC_RUN_ID`` under torchrun, else ``ARC_RUN_ID``)
    local_snapshots: bool | None = None
    #: node-local directory of those snapshots; None: ``/dev/shm/arc-dist-<user>-<key>`` (the temp
    #: dir where /dev/shm is missing). Removed by a clean ``close()``
    local_dir: str | None = None
    #: local snapshots kept per rank (2 survives a crash in the middle of writing one)
    local_keep: int = 2
    #: factor applied to every param group's LR when a failure recurs after a rollback
    #: (0 < f <= 1), as a multiplier on whatever LR the scheduler or the loop sets
    lr_backoff: float = 0.5
    #: undo the LR backoff step by step once training has recovered (one factor of
    #: ``1/lr_backoff`` every ``recovery_steps`` healthy steps, up to the scheduled LR)
    lr_restore: bool = True
    #: consecutive updates skipped for a non-finite or outlier loss or gradient; one more such
    #: step in a row is persistent trouble and rolls back. 0: roll back at the first one
    max_skips: int = 2
    #: consecutive rollbacks without recovery before escalating to an older snapshot; a
    #: rollback after the first one also backs off the LR (``lr_backoff``)
    max_rollbacks: int = 3
    #: healthy steps past the failed step that count as recovered (resets the rollback count)
    recovery_steps: int = 20
    #: steps between the deeper checks of weights and optimizer state (1 = every step)
    deep_check_every: int = 10
    #: steps between replica-divergence checks (DDP only; also on every snapshot step); 0 = off
    divergence_every: int = 100
    #: under DDP, carry the step's signals inside DDP's gradient all-reduce through a Python comm
    #: hook (ddp_hook.py). False: keep DDP's C++ all-reduce hook and run one small all-reduce of
    #: Arc's own every step; Arc then sees only averaged gradients, so a gradient fault is
    #: blamed on every rank rather than the one it came from. On 2-rank CPU/gloo False was as
    #: fast or faster in most paired runs (docs/performance.md); not yet measured on a GPU
    ride_ddp: bool = True
    #: include the optimizer state in the divergence fingerprint
    divergence_check_optimizer: bool = False
    #: divergence incidents on one rank before it is reported as suspect hardware
    suspect_after: int = 2
    #: end the job when a rank is suspect: that rank exits with ExitCode.HARDWARE, the others
    #: with RETRY, so the elastic agent restarts the group and the scheduler can replace the node
    exit_on_suspect: bool = False
    #: a rank whose busy time, over ``straggler_window`` steps, has a median above this multiple
    #: of the other ranks' is reported as a straggler
    straggler_ratio: float = 1.4
    straggler_window: int = 30
    #: on SIGTERM, write a final checkpoint and exit every rank with ExitCode.RETRY
    handle_sigterm: bool = True
    #: seconds without a ``step()`` before the process dumps stacks and exits; None disables
    hang_timeout: float | None = None
    #: extra seconds allowed for the first step and around checkpoint saves/loads
    hang_grace: float = 600.0
    #: run ``arc_dist.health.preflight`` over the group in ``Arc.__init__`` (collective: every
    #: rank constructs Arc); a failing check raises BadNodeError (exit code 13) before any step
    preflight: bool = False
    #: steps between ``metrics`` records in the event log (0 = none); ``Arc(metrics_every=)``
    #: overrides it
    metrics_every: int = 10
    #: where rank 0 appends ``events.jsonl``; None: ``checkpoint_dir``. ``Arc(log_dir=)`` overrides
    log_dir: str | None = None
    #: a fault-injection plan in the ``ARC_CHAOS`` grammar (arc_dist/chaos.py); None: ``ARC_CHAOS``
    #: when set. ``Arc(chaos=)`` overrides it
    chaos: str | None = None
    #: detector thresholds
    thresholds: Thresholds = field(default_factory=Thresholds)
    #: forecasts of instability (off by default; docs/early_warning.md)
    early_warning: EarlyWarning = field(default_factory=EarlyWarning)

    def __post_init__(self) -> None:
        for name in (
            "snapshot_every",
            "keep_snapshots",
            "max_rollbacks",
            "recovery_steps",
            "deep_check_every",
        ):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 1, name, v, "use an integer >= 1")
        for name in ("checkpoint_every", "confirm_after", "divergence_every", "max_skips"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 0, name, v, "use an integer >= 0")
        _check(
            isinstance(self.keep_checkpoints, int) and self.keep_checkpoints >= 1,
            "keep_checkpoints",
            self.keep_checkpoints,
            "use an integer >= 1 (the newest healthy checkpoint is always kept)",
        )
        _check(
            isinstance(self.lr_backoff, (int, float)) and 0 < self.lr_backoff <= 1,
            "lr_backoff",
            self.lr_backoff,
            "use a factor in (0, 1]; 1 disables the backoff",
        )
        _check(
            self.hang_timeout is None
            or (isinstance(self.hang_timeout, (int, float)) and self.hang_timeout > 0),
            "hang_timeout",
            self.hang_timeout,
            "use seconds > 0, or None to disable the watchdog",
        )
        _check(
            isinstance(self.straggler_ratio, (int, float))
            and math.isfinite(self.straggler_ratio)
            and self.straggler_ratio > 1,
            "straggler_ratio",
            self.straggler_ratio,
            "use a finite factor > 1, e.g. 1.4 (40% slower than the others)",
        )
        for name, low in (("suspect_after", 1), ("straggler_window", 3)):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= low, name, v, f"use an integer >= {low}")
        _check(self.hang_grace >= 0, "hang_grace", self.hang_grace, "use seconds >= 0")
        _check(isinstance(self.preflight, bool), "preflight", self.preflight, "use True or False")
        _check(
            self.local_snapshots is None or isinstance(self.local_snapshots, bool),
            "local_snapshots",
            self.local_snapshots,
            "use True, False or None (on when checkpoint_dir is set)",
        )
        _check(
            self.local_dir is None or (isinstance(self.local_dir, str) and self.local_dir != ""),
            "local_dir",
            self.local_dir,
            "use a node-local directory path (str), or None for /dev/shm",
        )
        _check(
            isinstance(self.local_keep, int) and self.local_keep >= 1,
            "local_keep",
            self.local_keep,
            "use an integer >= 1 (2 survives a crash while one is being written)",
        )
        _check(
            isinstance(self.metrics_every, int) and self.metrics_every >= 0,
            "metrics_every",
            self.metrics_every,
            "use an integer >= 0 (0 = no metrics records)",
        )
        for name, fix in (
            ("log_dir", "use a directory path or fsspec URL (str), or None for checkpoint_dir"),
            ("chaos", 'use a fault plan string such as "nan_loss@30", or None'),
        ):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, str) and v.strip() != ""), name, v, fix)
        if not isinstance(self.thresholds, Thresholds):
            raise TypeError(
                f"ArcConfig.thresholds must be an arc_dist.config.Thresholds, "
                f"got {type(self.thresholds).__name__}"
            )
        if not isinstance(self.early_warning, EarlyWarning):
            raise TypeError(
                f"ArcConfig.early_warning must be an arc_dist.config.EarlyWarning (e.g. "
                f"EarlyWarning(enabled=True)), got {type(self.early_warning).__name__}"
            )
        ew = self.early_warning
        if ew.enabled and ew.lr_factor not in (None, 1, 1.0) and not self.lr_restore:
            # nothing would undo the lowering: forecasts on healthy runs would compound it to 0
            raise ValueError(
                f"ArcConfig.early_warning.lr_factor={ew.lr_factor} needs lr_restore=True (it is "
                "False: every forecast would lower the LR for good). Fix: lr_restore=True, or "
                "lr_factor=None"
            )
        kept_for = self.checkpoint_every * self.keep_checkpoints
        if self.checkpoint_every and self.confirm_after > kept_for:
            # a warning, not an error: resume and rollback stay safe, the fallback is what suffers
            warnings.warn(
                f"ArcConfig.confirm_after={self.confirm_after} is more than checkpoint_every * "
                f"keep_checkpoints = {self.checkpoint_every} * {self.keep_checkpoints} steps: "
                "retention deletes most checkpoints before they can be confirmed, so the confirmed "
                "fallback is old or missing (a restart still resumes from the newest healthy "
                f"checkpoint). Fix: keep_checkpoints >= "
                f"{-(-self.confirm_after // self.checkpoint_every)} or confirm_after <= {kept_for}",
                UserWarning,
                stacklevel=3,
            )

    def digest_fields(self) -> dict:
        """A JSON-able view, used for the checkpoint manifest's config digest (what is logged and
        injected does not change what a checkpoint holds, so it is left out)."""
        d = dataclasses.asdict(self)
        for name in _NOT_DIGESTED:
            d.pop(name)
        return d

    # -- other forms (config_io.py: naming, precedence) --------------------------------------
    def to_dict(self) -> dict:
        """Nested plain values; ``from_dict`` reads it back."""
        return config_io.to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping, *, env: bool = False) -> ArcConfig:
        """From nested (``{"thresholds": {"window": 50}}``) or flat (``thresholds__window``)
        keys; ``env=True`` applies ``ARC_CONFIG_*`` variables on top. Unknown keys raise."""
        flat = {k: v for k, v in data.items() if config_io.SEP in k}
        nested = {k: v for k, v in data.items() if config_io.SEP not in k}
        nested = config_io.merge(nested, config_io.unflatten(cls, flat, "ArcConfig.from_dict"))
        if env:
            nested = config_io.merge(nested, config_io.from_env(cls))
        return config_io.build(cls, nested, "ArcConfig.from_dict")

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, *, section: str | None = None, env: bool = False
    ) -> ArcConfig:
        """From a ``.yaml``/``.yml`` (needs PyYAML), ``.toml`` or ``.json`` file, or one
        ``section`` (table) of it; ``env=True`` as in ``from_dict``."""
        return cls.from_dict(config_io.read_file(path, section), env=env)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ArcConfig:
        """The defaults with ``ARC_CONFIG_*`` variables applied (``ARC_CONFIG_MAX_SKIPS=3``)."""
        return config_io.build(cls, config_io.from_env(cls, environ), "environment")

    @classmethod
    def flat_fields(cls) -> dict[str, tuple[Any, Any]]:
        """``{flat name: (type, default)}``: ``max_skips``, ``thresholds__window``, ..."""
        return config_io.flat_fields(cls)

    @classmethod
    def from_flat(cls, **flat: Any) -> ArcConfig:
        """From flat names (``from_flat(max_skips=3, thresholds__window=50)``)."""
        return cls.from_dict(flat)


#: fields left out of the config digest
_NOT_DIGESTED = ("metrics_every", "log_dir", "chaos")


#: ``ArcConfig`` as one dataclass field per flat name (``max_skips``, ``thresholds__window``), for
#: ``HfArgumentParser`` and jsonargparse; ``ArcConfigFlat(...).to_config()`` is the ``ArcConfig``
ArcConfigFlat = config_io.flat_dataclass(ArcConfig)
