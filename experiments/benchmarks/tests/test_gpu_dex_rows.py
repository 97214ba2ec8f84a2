"""Section D of the GPU suite (DEX dispatch and plain MAE, ``dex_rows.py``) as a CPU dry run:
the tests' tiny DEX, batch 2, the same code the GPU call runs. Checked: every row ends ok with
positive rates, the compiled rows run, and the host-read audit finds the loop's ``torch.where``
per expert and block, the sorted dispatch's one read per block, and none in the dense one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.benchmarks import dex_rows
from experiments.benchmarks.gpu_rows import SECTIONS

BENCH = Path(__file__).resolve().parents[1]
ROOT = BENCH.parents[1]
MICRO = dex_rows.PRESETS["micro"]
BLOCKS = MICRO["backbone_kwargs"]["depth"]
EXPERTS = MICRO["num_experts"]


@pytest.fixture(scope="module")
def section_d(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_d")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(BENCH / "gpu_suite.py"), "section", "D", "--device", "cpu",
         "--micro", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_D.json", "gpu_D.md"]
    return json.loads((out / "gpu_D.json").read_text())


@pytest.mark.timeout(300)
def test_every_dex_row_runs(section_d: dict) -> None:
    assert section_d["finished"] is True
    rows = section_d["rows"]
    assert len(rows) == len(SECTIONS["D"][1])
    assert {r["impl"] for r in rows} == set(dex_rows.IMPLS)
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    timed = [r for r in rows if r["kind"] != "audit"]
    assert {(r["impl"], r["compile"]) for r in timed} >= {
        ("dex-loop", False), ("dex-dense", False), ("dex-grouped", False), ("mae", False),
        ("dex-dense", True), ("dex-grouped", True), ("mae", True)}
    for r in timed:
        assert r["images_per_s"] > 0 and r["flops_per_step"] > 0 and r["steps_timed"] == 2
    flops = {r["impl"]: r["flops_per_image"] for r in timed}
    # the dense dispatch runs every expert on every image: more FLOPs than the loop's top-k
    assert flops["dex-dense"] > flops["dex-loop"] == flops["dex-sorted"] > flops["mae"]
    # grouped: the loop's GEMMs (dex_rows registers the grouped op's formula)
    assert flops["dex-grouped"] == pytest.approx(flops["dex-loop"], rel=1e-3)
    meta = section_d["meta"]
    assert meta["preset"] == "dex:micro" and meta["views_px"] == [32, 32]


@pytest.mark.timeout(300)
def test_audit_finds_the_dispatch_reads(section_d: dict) -> None:
    audits = {r["impl"]: r for r in section_d["rows"] if r["kind"] == "audit"}
    assert set(audits) == {"dex-loop", "dex-dense", "dex-sorted", "dex-grouped"}

    def reads(impl: str, site: str) -> float:
        return sum(float(line.split()[0]) for line in audits[impl]["sync_sites"] if site in line)

    assert reads("dex-loop", "_mix_loop") == BLOCKS * EXPERTS
    assert reads("dex-sorted", "_mix_sorted") == BLOCKS
    assert reads("dex-dense", "models/dex.py") == 0
    assert reads("dex-grouped", "models/dex.py") == 0
