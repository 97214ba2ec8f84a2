"""Find the operations of a training step that would make the host wait for a CUDA device.

On a GPU, ``torch.cuda.set_sync_debug_mode("warn")`` is the ground truth. This module gives the
same answer on a CPU for the operations that decide it: a dispatch mode records every aten op
whose CUDA kernel reads a device value back to the host (``.item()``, ``bool(tensor)``, boolean
mask indexing, ``nonzero``, ``bincount``, ...). What it cannot see on a CPU: blocking
host-to-device copies (``torch.tensor(x, device="cuda")``) and explicit synchronisations;
those are left to the GPU check (``bench_step.py --sync-debug``).
"""

from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose CUDA implementation copies a device value to the host before it can return.
_ALWAYS_SYNC = {
    aten._local_scalar_dense.default,  # .item(), float(t), int(t), bool(t), if t: ...
    aten.is_nonzero.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.bincount.default,
    aten.equal.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.repeat_interleave.Tensor,  # output size unknown without output_size
}
# Ops that sync only when one of their index arguments is a boolean mask.
_BOOL_INDEX = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


def _has_bool_index(args: tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


@dataclass
class SyncReport:
    """Counts per op and, for each op, the innermost frames of midol code that issued it."""

    counts: Counter = field(default_factory=Counter)
    sites: dict[str, set[str]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        return [
            f"{op}: {n} ({'; '.join(sorted(self.sites.get(op, ()))) or 'outside midol'})"
            for op, n in self.counts.most_common()
        ]


def _site(code_roots: tuple[str, ...]) -> str | None:
    for frame in reversed(traceback.extract_stack()[:-3]):
        if any(root in frame.filename for root in code_roots):
            return f"{frame.filename.split('/midol/')[-1]}:{frame.lineno} {frame.name}"
    return None


class SyncAudit(TorchDispatchMode):
    """``with SyncAudit() as audit: step()`` then ``audit.report``.

    ``code_roots`` are path fragments of the code whose call sites are reported
    (default: the midol package)."""

    def __init__(self, code_roots: tuple[str, ...] = ("/midol/",)) -> None:
        super().__init__()
        self.code_roots = code_roots
        self.report = SyncReport()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func in _ALWAYS_SYNC or (func in _BOOL_INDEX and _has_bool_index(args)):
            name = str(func.overloadpacket.__name__)
            if func in _BOOL_INDEX:
                name += "[bool mask]"
            self.report.counts[name] += 1
            site = _site(self.code_roots)
            if site is not None:
                self.report.sites.setdefault(name, set()).add(site)
        return func(*args, **(kwargs or {}))
