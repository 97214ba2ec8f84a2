"""Which configurations the GPU suite measures: a ``Row`` (a step_impls case plus timm's
fused attention, or a host-sync audit), the sections A, B and C as rows in priority order, and
the record each row starts from in ``gpu_<section>.json``. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Row:
    """One table row: a step_impls case, plus timm's fused (SDPA) attention for Swin."""

    impl: str
    views: str
    compile: bool = False
    ckpt: bool = False
    fused_attn: bool = False  # TIMM_FUSED_ATTN=2 (Swin's attention is "experimental" in timm)
    audit: bool = False  # a host-sync audit instead of a timed row

    @property
    def label(self) -> str:
        if self.audit:
            return f"{self.impl} [sync audit]"
        extras = [x for x, on in (("compile", self.compile), ("ckpt", self.ckpt),
                                  ("fused-attn", self.fused_attn)) if on]
        return f"{self.impl} [{'+'.join(extras) or 'eager'}]"

    @property
    def kind(self) -> str:
        """``audit``, ``compile`` or ``eager``: what the budget estimates per row go by."""
        return "audit" if self.audit else ("compile" if self.compile else "eager")


def _r(impl: str, views: str = "dino", **kw: bool) -> Row:
    return Row(impl, views, **kw)


# Priority order within each section: what matters most first, the budget may cut the tail.
SECTIONS: dict[str, tuple[str, list[Row]]] = {
    "A": ("Eager step table (both view settings) and host-sync audit", [
        _r("midol"), _r("midol-dino"), _r("authors", "authors"), _r("lightly"),
        _r("midol", audit=True), _r("midol-dinoce"),
        _r("midol", "authors"), _r("midol-dino", "authors"), _r("midol-dinoce", "authors"),
        _r("lightly", "authors"),
        _r("midol-dino", audit=True), _r("midol-dinoce", audit=True),
        # the faithful baselines' host reads (the authors' per-parameter clipping: ~674 on Swin-B)
        _r("authors", "authors", audit=True), _r("lightly", audit=True),
    ]),
    "B": ("torch.compile, activation checkpointing and fused attention (DINO view setting)", [
        _r("midol-dino"), _r("midol-dino", fused_attn=True), _r("midol-dino", ckpt=True),
        _r("midol-dino", compile=True), _r("midol-dino", compile=True, ckpt=True),
        _r("midol"), _r("midol", compile=True), _r("midol-dino", compile=True, fused_attn=True),
    ]),
    # What B's budget may leave out, and the rest of the grid (a third call, or "A B C" when
    # one call may run longer).
    "C": ("The rest of the compile grid (DINO view setting)", [
        _r("midol-dino"), _r("midol"), _r("midol", compile=True),
        _r("midol-dino", compile=True, fused_attn=True), _r("midol", compile=True, ckpt=True),
        _r("midol-dinoce"), _r("midol-dinoce", compile=True),
        _r("midol", compile=True, fused_attn=True),
        # the earlier per-view restatements, kept as labelled extra rows (not the code people run)
        _r("authors-per-view", "authors"), _r("lightly-toy"),
    ]),
    # DEX and its plain-MAE baseline (issue 30 items 4-5; dex_rows.py): the dispatch without
    # host reads (dense) against the loop, the whole step compiled, and the syncs per step.
    "D": ("DEX dispatch and plain MAE (ViT-B/16, one view, bf16)", [
        _r("dex-loop", "mae"), _r("dex-grouped", "mae"), _r("dex-dense", "mae"),
        _r("mae", "mae"), _r("dex-grouped", "mae", compile=True),
        _r("dex-loop", "mae", audit=True), _r("dex-grouped", "mae", audit=True),
        _r("dex-dense", "mae", compile=True), _r("mae", "mae", compile=True),
        _r("dex-sorted", "mae"), _r("dex-loop", "mae", compile=True),
        _r("dex-dense", "mae", audit=True), _r("dex-sorted", "mae", audit=True),
    ]),
}


def row_record(section: str, index: int, row: Row, batch: int) -> dict[str, Any]:
    """The row's entry in ``gpu_<section>.json``, before its measurements."""
    return {"section": section, "row": index, "label": row.label, "impl": row.impl,
            "views": row.views, "batch": batch, "compile": row.compile, "ckpt": row.ckpt,
            "fused_attn": row.fused_attn,
            "kind": row.kind}
