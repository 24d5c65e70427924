"""Durable sharded checkpoints: DCP through fsspec, atomic commit, healthy confirmation.

Layout of a checkpoint root (any fsspec URL)::

    <url>/step_<N>/__<rank>_<i>.distcp   DCP data, one file per rank
    <url>/step_<N>/.metadata             DCP metadata
    <url>/step_<N>/arc_manifest.json     commit marker: sizes, checksums, step, world size, ...
    <url>/step_<N>/arc_confirmed.json    present once confirm_after healthy steps followed

Modules: ``storage`` (fsspec URLs), ``manifest`` (the JSON commit marker), ``dcp_io`` (DCP
writer/reader adapters), ``state`` (the Stateful wrappers), ``catalog`` (listing, verification),
``retention`` (what to delete), ``errors`` (storage faults and their classification),
``loading`` and ``saving`` (the two halves of the protocol), ``lifecycle`` (the pure confirmation
rules), ``manager`` (``CheckpointManager``, the façade). See docs/checkpoints.md.
"""

from .catalog import CheckpointInfo, scan, verify
from .errors import CheckpointStorageError
from .manager import CheckpointManager
from .manifest import Manifest
from .state import PerRank, Reshard, TrainState
from .storage import Storage

__all__ = [
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointStorageError",
    "Manifest",
    "PerRank",
    "Reshard",
    "Storage",
    "TrainState",
    "scan",
    "verify",
]
