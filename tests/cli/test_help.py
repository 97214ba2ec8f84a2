"""Every option of every shipped module and datamodule has a help line (from its docstring)."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from midol.cli import main

MODULES = ["midol.methods.MIDoL", "midol.methods.DEX", "midol.fusion.MedMIX",
           "midol.tasks.ClassificationModule", "midol.tasks.MultiLabelModule",
           "midol.tasks.SegmentationModule"]
DATA = ["midol.data.PretrainDataModule", "midol.data.LabelledDataModule",
        "midol.data.SegmentationDataModule", "midol.data.PatientDataModule"]


def undocumented(section: str, class_path: str) -> list[str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main(["fit", f"--{section}.help", class_path])
    out = buf.getvalue()
    lines = out.splitlines()
    missing = []
    for i, line in enumerate(lines):
        if re.match(rf"^  --{section}\.\S+", line):
            # jsonargparse prints the description on the option's line or the next one;
            # without a description the next line starts with "(type: ...)"
            rest = line.split("  ", 2)[-1].strip() if line.count("  ") > 1 else ""
            following = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if not rest and (following.startswith("(type:") or not following):
                missing.append(line.split()[0])
    assert any(re.match(rf"^  --{section}\.", ln) for ln in lines), out[-2000:]
    return missing


@pytest.mark.parametrize(("section", "class_path"), [("model", m) for m in MODULES] + [("data", d) for d in DATA])
def test_every_option_has_a_description(section, class_path):
    assert undocumented(section, class_path) == []
