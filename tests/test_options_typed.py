"""Every method's and task's ``self.hparams`` is typed (``<Class>Options`` beside the class):
the protocol names exactly the ``__init__`` arguments along the class chain, with the same
annotations, and mypy rejects a misspelt option name."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from midol.fusion.module import MedMIX, MedMIXOptions
from midol.methods.base import BaseMethod, BaseMethodOptions
from midol.methods.dex import DEX, DEXOptions
from midol.methods.midol import MIDoL, MIDoLOptions
from midol.methods.momentum import MomentumMethod, MomentumMethodOptions
from midol.tasks.base import FinetuneModule, FinetuneModuleOptions
from midol.tasks.classification import ClassificationModule, ClassificationModuleOptions
from midol.tasks.group_classification import (
    GroupClassificationModule,
    GroupClassificationModuleOptions,
)
from midol.tasks.multilabel import MultiLabelModule, MultiLabelModuleOptions
from midol.tasks.segmentation import SegmentationModule, SegmentationModuleOptions

PAIRS = [(BaseMethod, BaseMethodOptions), (MomentumMethod, MomentumMethodOptions),
         (MIDoL, MIDoLOptions), (DEX, DEXOptions), (MedMIX, MedMIXOptions),
         (FinetuneModule, FinetuneModuleOptions), (ClassificationModule, ClassificationModuleOptions),
         (MultiLabelModule, MultiLabelModuleOptions), (SegmentationModule, SegmentationModuleOptions),
         (GroupClassificationModule, GroupClassificationModuleOptions)]


def init_arguments(cls: type) -> dict[str, str]:
    """Name -> annotation text of every ``__init__`` argument along the ``**kwargs`` chain."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None or not klass.__module__.startswith("midol."):
            continue
        for name, p in inspect.signature(init).parameters.items():
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                out[name] = str(p.annotation)
    return out


def protocol_fields(proto: type) -> dict[str, str]:
    out: dict[str, str] = {}
    for klass in reversed(proto.__mro__):
        out.update({k: str(v) for k, v in klass.__dict__.get("__annotations__", {}).items()})
    return out


@pytest.mark.parametrize("cls,proto", PAIRS, ids=lambda x: x.__name__)
def test_options_protocol_equals_the_init_arguments(cls: type, proto: type) -> None:
    assert protocol_fields(proto) == init_arguments(cls)


def test_mypy_rejects_a_misspelt_option(tmp_path: Path) -> None:
    api = pytest.importorskip("mypy.api")
    repo = Path(__file__).resolve().parents[1]
    snippet = tmp_path / "typo.py"
    snippet.write_text("from midol.methods.midol import MIDoL\n\n\n"
                       "def f(m: MIDoL) -> float:\n"
                       "    ok: float = m.hparams.teacher_temp\n"
                       "    return ok + m.hparams.teacher_tmp\n")
    out, _, status = api.run([str(snippet), "--ignore-missing-imports", "--follow-imports", "silent",
                              "--cache-dir", str(repo / ".mypy_cache"), "--no-error-summary"])
    assert status == 1
    errors = [line for line in out.splitlines() if "error" in line]
    assert len(errors) == 1 and "teacher_tmp" in errors[0] and ":6:" in errors[0]
