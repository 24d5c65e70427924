"""Optional NVML queries (``pynvml``, the ``nvml`` extra): the ``nvml`` check.

Pending page retirement, pending or failed row remapping, uncorrectable volatile ECC errors,
and XID critical events raised while the other checks run. Every query degrades to a note when
the GPU or driver does not support it; without ``pynvml`` or a driver the check is skipped.
"""

from __future__ import annotations

from typing import Any

import torch

from .names import FAILED, PASSED, SKIPPED, injected


class Nvml:
    """Optional NVML queries; every method degrades to a "not available" note."""

    def __init__(self, enabled: bool):
        self.lib: Any = None
        self.why = "disabled (nvml=False)"
        self._events: Any = None
        if not enabled:
            return
        try:
            import pynvml
        except ImportError:
            self.why = "pynvml not installed (pip install 'arc-dist[nvml]')"
            return
        try:
            pynvml.nvmlInit()
        except Exception as e:  # noqa: BLE001 - NVMLError and friends: no driver here
            self.why = f"NVML unavailable: {e}"
            return
        self.lib = pynvml

    def handle(self, device: torch.device) -> Any:
        p = self.lib
        props = torch.cuda.get_device_properties(device)
        uuid = str(getattr(props, "uuid", "") or "")
        if uuid:
            try:
                return p.nvmlDeviceGetHandleByUUID(
                    uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
                )
            except Exception:  # noqa: BLE001 - fall back to the PCI address
                pass
        bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        return p.nvmlDeviceGetHandleByPciBusId(bus)

    def watch_xids(self, devices: list[torch.device]) -> str:
        """Start collecting XID events, so any raised while the checks run is reported."""
        if self.lib is None or not devices:
            return ""
        p = self.lib
        try:
            self._events = p.nvmlEventSetCreate()
            for d in devices:
                p.nvmlDeviceRegisterEvents(
                    self.handle(d), p.nvmlEventTypeXidCriticalError, self._events
                )
        except Exception as e:  # noqa: BLE001 - e.g. NVMLError_NotSupported
            self._events = None
            return f"XID events not available ({e})"
        return ""

    def xids(self) -> list[int]:
        if self._events is None:
            return []
        out = []
        for _ in range(64):
            try:
                ev = self.lib.nvmlEventSetWait(self._events, 0)
            except Exception:  # noqa: BLE001 - NVMLError_Timeout: nothing (more) pending
                break
            out.append(int(ev.eventData))
        return out

    def check(self, device: torch.device, inject: bool, xid_note: str) -> tuple[str, str]:
        if inject:
            return FAILED, "retired pages pending: the GPU needs a reset" + injected(True)
        if self.lib is None:
            return SKIPPED, self.why
        p, h = self.lib, self.handle(device)
        problems, notes = [], []

        def query(what: str, fn):
            try:
                return fn()
            except Exception:  # noqa: BLE001 - NotSupported on this GPU or driver
                notes.append(f"{what} n/a")
                return None

        pending = query("page retirement", lambda: p.nvmlDeviceGetRetiredPagesPendingStatus(h))
        if pending:
            problems.append("retired pages pending (reset the GPU)")
        rows = query("row remapping", lambda: p.nvmlDeviceGetRemappedRows(h))
        if rows is not None:
            _, unc, rows_pending, failed = rows
            if failed:
                problems.append("row remapping failed (replace the GPU)")
            elif rows_pending:
                problems.append(f"row remapping pending, {unc} uncorrectable rows (reset the GPU)")
        ecc = query(
            "ECC counters",
            lambda: p.nvmlDeviceGetTotalEccErrors(
                h, p.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, p.NVML_VOLATILE_ECC
            ),
        )
        if ecc:
            problems.append(f"{ecc} uncorrectable ECC errors since the driver loaded")
        xids = self.xids()
        if xids:
            problems.append(f"XID {', '.join(map(str, xids))} during the checks")
        if xid_note:
            notes.append(xid_note)
        if problems:
            return FAILED, "; ".join(problems)
        return PASSED, "no pending retirement/remapping, no uncorrectable ECC, no XID" + (
            f" ({'; '.join(notes)})" if notes else ""
        )
