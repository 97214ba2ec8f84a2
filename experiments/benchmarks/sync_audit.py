"""Find the operations of a training step that would make the host wait for a CUDA device.

On a GPU, ``torch.cuda.set_sync_debug_mode("warn")`` is the ground truth. This module gives the
same answer on a CPU for the operations that decide it: a dispatch mode records every aten op
whose CUDA kernel reads a device value back to the host (``.item()``, ``bool(tensor)``, boolean
mask indexing, ``nonzero``, ``bincount``, ...). What it cannot see on a CPU: blocking
host-to-device copies (``torch.tensor(x, device="cuda")``) and explicit synchronisations;
those are left to the GPU check (``bench_step.py --sync-debug``).
"""

from __future__ import annotations

import os
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import midol

_MIDOL_ROOT = os.path.dirname(os.path.abspath(midol.__file__)) + os.sep

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
    """How often each op was issued from each call site (``op @ site``)."""

    counts: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def in_midol(self) -> Counter:
        """The counts whose call site is midol code (sites of other libraries are in [...])."""
        return Counter({k: n for k, n in self.counts.items() if not k[1].startswith("[")})

    def on_gpu(self) -> int:
        """The total without the call sites that only a CPU run has."""
        return sum(n for (_, site), n in self.counts.items() if not _cpu_only(site))

    def lines(self, steps: int = 1) -> list[str]:
        """One line per (op, call site): count per step, op, site and what is known of it."""
        out = []
        for (op, site), n in self.counts.most_common():
            note = next((v for k, v in _NOTES.items() if k in site), "")
            out.append(f"{n / steps:5.1f}  {op:<22s} {site}" + (f"  <- {note}" if note else ""))
        return out


def _cpu_only(site: str) -> bool:
    return any(k in site for k in _CPU_ONLY)


# What is known about some call sites (the audit runs on a CPU; the question is a GPU's).
_CPU_ONLY = ("optimizer.py:102 _get_value",)
_NOTES = {
    _CPU_ONLY[0]: "CPU only: non-fused AdamW's step counter (CUDA: fused AdamW)",
    "_check_finite": "deliberate: the non-finite loss check (model nonfinite option)",
    "_engine_run_backward": "backward of a boolean-mask index of the forward pass",
}


_INTERNAL = ("/torch/utils/_python_dispatch.py", "/torch/_tensor.py", "/torch/_ops.py",
             "/torch/overrides.py", "sync_audit.py", "/torch/utils/_device.py",
             "/torch/_compile.py", "/torch/_dynamo/eval_frame.py")


def _site(code_roots: tuple[str, ...]) -> str:
    """``file:line function`` of the innermost frame under one of ``code_roots``; else of the
    innermost frame outside torch's dispatch machinery, in brackets (another library)."""
    stack = traceback.extract_stack()[:-3]
    for frame in reversed(stack):
        root = next((r for r in code_roots if frame.filename.startswith(r)), None)
        if root is not None:
            return f"{frame.filename[len(root):]}:{frame.lineno} {frame.name}"
    for frame in reversed(stack):
        if not frame.filename.endswith(_INTERNAL):
            short = frame.filename.split("site-packages/")[-1]
            return f"[{short}:{frame.lineno} {frame.name}]"
    return "[unknown]"


class SyncAudit(TorchDispatchMode):
    """``with SyncAudit() as audit: step()`` then ``audit.report``.

    ``code_roots`` are folders whose call sites are reported (default: the midol package)."""

    def __init__(self, code_roots: tuple[str, ...] = (_MIDOL_ROOT,)) -> None:
        super().__init__()
        self.code_roots = code_roots
        self.report = SyncReport()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func in _ALWAYS_SYNC or (func in _BOOL_INDEX and _has_bool_index(args)):
            name = str(func.overloadpacket.__name__)
            if func in _BOOL_INDEX:
                name += "[bool mask]"
            self.report.counts[(name, _site(self.code_roots))] += 1
        return func(*args, **(kwargs or {}))


class SyncAuditCallback(L.Callback):
    """Audits a Lightning fit from the start of step ``first_step`` to the end of training
    (the module's own batch hooks included). ``report`` then holds the counts of
    ``steps`` steps; set-up and the first steps, which read values back once, stay out."""

    def __init__(self, first_step: int = 1) -> None:
        self.first_step = first_step
        self.audit = SyncAudit()
        self.steps = 0
        self._active = False

    @property
    def report(self) -> SyncReport:
        return self.audit.report

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.first_step:
            if not self._active:
                self.audit.__enter__()
                self._active = True
            self.steps += 1

    def on_train_end(self, trainer, pl_module) -> None:
        if self._active:
            self.audit.__exit__(None, None, None)
            self._active = False
