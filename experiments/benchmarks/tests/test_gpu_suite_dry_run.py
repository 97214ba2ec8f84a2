"""The GPU script (run_gpu.sh + gpu_suite.py) as a CPU dry run: ``MIDOL_BENCH_DRY=1`` runs the
preflight and sections A and B with the micro Swin on the CPU, exactly as they run on a GPU
otherwise. Checked: every section ends ok with positive rows, results land only under $OUT, a
broken preflight stops within seconds and skips the sections, carried wheels install with
pip --no-index into a scratch folder (a wheel built here: nothing is downloaded)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from experiments.benchmarks import gpu_section, gpu_suite

BENCH = Path(__file__).resolve().parents[1]
ROOT = BENCH.parents[1]
SCRIPT = BENCH / "run_gpu.sh"
RESULTS = ROOT / "experiments" / "results"
ROW_KEYS = {"section", "row", "label", "impl", "views", "batch", "compile", "ckpt",
            "fused_attn", "status", "images_per_s", "step_ms", "flops_per_step", "tflops",
            "mfu", "mfu_measured_peak", "peak_mem_gib", "wall_s"}
# What comes back from a GPU call's $OUT: at most 8 files, plain names.
MAX_OUT_FILES = 8


def _env(out: Path, tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OUT=str(out), MIDOL_BENCH_DRY="1", PYTHON=sys.executable,
        PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        WHEELS=str(tmp / "no-wheels"), MIDOL_BENCH_SITE=str(tmp / "site"),
    )
    env.pop("MIDOL_BENCH_BREAK", None)
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, float, dict]:
    tmp = tmp_path_factory.mktemp("gpu_dry")
    out = tmp / "out"
    before = _snapshot(RESULTS)
    logs_before = (ROOT / "lightning_logs").exists()
    t0 = time.monotonic()
    done = _run(["A", "B"], _env(out, tmp))
    elapsed = time.monotonic() - t0
    assert _snapshot(RESULTS) == before, "run_gpu.sh wrote into experiments/results"
    assert (ROOT / "lightning_logs").exists() == logs_before, "Lightning wrote into the checkout"
    return done, out, elapsed, json.loads((out / "status.json").read_text())


@pytest.mark.timeout(300)
def test_dry_run_every_section_ok(dry_run) -> None:
    done, _, elapsed, status = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    sections = status["sections"]
    assert set(sections) == {"preflight", "A", "B"}
    assert all(s["status"] == "ok" and s["rc"] == 0 for s in sections.values()), sections
    assert sections["preflight"]["checks"]["midol_step"] == "ok"
    # The 3-minute bound is about the script, not the machine: on cores other jobs share
    # (load above the core count) the wall time says nothing about it, so it is not asserted.
    if os.getloadavg()[0] <= (os.cpu_count() or 1):
        assert elapsed < 180


@pytest.mark.timeout(300)
def test_dry_run_rows_have_positive_rates_and_every_key(dry_run) -> None:
    _, out, _, _ = dry_run
    for name, expect in (("A", 14), ("B", 8)):
        data = json.loads((out / f"gpu_{name}.json").read_text())
        assert data["finished"] is True
        rows = data["rows"]
        assert len(rows) == expect == len(gpu_suite.SECTIONS[name][1])
        timed = [r for r in rows if r["kind"] != "audit"]
        for r in timed:
            if r["impl"] == "lightly" and r["status"].startswith("skipped: lightly"):
                continue  # lightly is optional (pip install -e '.[bench]')
            assert r["status"] == "ok", r
            assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
            assert r["images_per_s"] > 0 and r["tflops"] > 0 and r["mfu"] > 0
            assert r["flops_counted_at_batch"] == gpu_suite.FLOP_BATCH
            assert r["steps_timed"] == 2 and len(r["step_s"]) == 2
        meta = data["meta"]
        assert meta["peak_flops"] == 989e12 and meta["measured_peak_flops"] == 790e12
        md = (out / f"gpu_{name}.md").read_text()
        for text in ("* date:", "* device:", "torch ", "timm ", "* command: `OUT=",
                     "run_gpu.sh A B", "MFU (989)", "MFU (790)", "| midol-dino | dino | 2 |"):
            assert text in md, text
    audits = [r for r in json.loads((out / "gpu_A.json").read_text())["rows"]
              if r["kind"] == "audit"]
    assert [r["impl"] for r in audits] == ["midol", "midol-dino", "midol-dinoce", "authors", "lightly"]
    for r in audits:
        if r["impl"] == "lightly" and r["status"].startswith("skipped: lightly"):
            continue  # lightly is optional (pip install -e '.[bench]')
        assert r["status"] == "ok" and r["syncs_per_step"] >= 0, r
    # the authors' per-parameter clipping reads every parameter's norm back; midol reads one flag
    by_impl = {r["impl"]: r for r in audits}
    assert by_impl["authors"]["syncs_per_step"] > 10 * max(by_impl["midol"]["syncs_per_step"], 1)
    # FLOPs counted at batch 2 and scaled: what a count at batch 4 gives (the micro head's
    # B x B logits are the only super-linear term; negligible for Swin-B).
    check = json.loads((out / "gpu_A.json").read_text())["meta"]["flop_scaling_check"]
    assert check["batch"] == 4 and abs(check["rel_diff"]) < 0.02, check
    b_rows = json.loads((out / "gpu_B.json").read_text())["rows"]
    assert {(r["compile"], r["ckpt"], r["fused_attn"]) for r in b_rows} >= {
        (False, False, False), (True, False, False), (False, True, False), (False, False, True),
        (True, True, False), (True, False, True)}
    assert all(r["fused_attn_active"] for r in b_rows if r["fused_attn"])


@pytest.mark.timeout(300)
def test_dry_run_writes_only_a_few_plain_files_under_out(dry_run) -> None:
    _, out, _, _ = dry_run
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert files == ["gpu_A.json", "gpu_A.md", "gpu_B.json", "gpu_B.md", "gpu_preflight.json",
                     "run.log", "status.json"]
    assert len(files) <= MAX_OUT_FILES


def _probe_wheel(folder: Path) -> Path:
    """A one-module wheel, built here, for the --no-index install path."""
    folder.mkdir(parents=True)
    dist = "midol_bench_probe-0.1.dist-info"
    files = {
        "midol_bench_probe/__init__.py": "VALUE = 1\n",
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: midol-bench-probe\nVersion: 0.1\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    path = folder / "midol_bench_probe-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
        zf.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return path


@pytest.mark.timeout(120)
def test_broken_preflight_stops_fast_and_skips_the_sections(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    _probe_wheel(wheels)
    wheel_list = tmp_path / "wheels.txt"
    wheel_list.write_text("# the probe only\nmidol-bench-probe==0.1\npytest==0.1  # min=1.0\n")
    out = tmp_path / "out"
    env = _env(out, tmp_path, WHEELS=str(wheels), WHEELS_LIST=str(wheel_list),
               MIDOL_BENCH_BREAK="albumentations")
    t0 = time.monotonic()
    done = _run(["A", "B"], env, timeout=100)
    elapsed = time.monotonic() - t0
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-2000:]
    assert elapsed < 40, f"a broken preflight took {elapsed:.0f} s"
    status = json.loads((out / "status.json").read_text())
    pre = status["sections"]["preflight"]
    assert pre["status"] == "failed (rc 1)" and pre["failed_check"] == "imports"
    assert "albumentations" in pre["checks"]["imports"]
    assert status["sections"]["A"]["status"] == status["sections"]["B"]["status"] \
        == "skipped: preflight failed"
    assert not (out / "gpu_A.json").exists() and not (out / "gpu_B.json").exists()
    report = json.loads((out / "gpu_preflight.json").read_text())
    assert report["ok"] is False and report["failed"] == "imports"
    # The wheels: only the missing one went in, from the folder, into the scratch site.
    wheels_entry = status["setup"]["wheels"]
    assert wheels_entry["status"] == "ok", wheels_entry
    assert wheels_entry["note"].endswith(": midol-bench-probe==0.1")  # not pytest: new enough
    assert (tmp_path / "site" / "midol_bench_probe" / "__init__.py").is_file()


def test_out_unset_fails_at_once(tmp_path: Path) -> None:
    env = _env(tmp_path, tmp_path)
    del env["OUT"]
    done = _run(["A"], env, timeout=30)
    assert done.returncode == 2 and "OUT is not set" in done.stderr
    env = _env(tmp_path / "out", tmp_path)
    done = _run(["Z"], env, timeout=30)
    assert done.returncode == 2 and "usage" in done.stderr
    assert not (tmp_path / "out").exists()


def test_missing_wheels_lists_absent_and_too_old_distributions(tmp_path: Path) -> None:
    listing = tmp_path / "wheels.txt"
    listing.write_text("# comment\n\nno-such-dist-xyz==1.0\npytest==8.0  # min=1.0\n"
                       "pytest==999.0  # min=999.0\n")
    assert gpu_suite.missing_wheels(listing) == ["no-such-dist-xyz==1.0", "pytest==999.0"]
    assert len(gpu_suite.missing_wheels(listing, everything=True)) == 3
    names = {n for n, _, _ in gpu_suite.read_wheel_list(BENCH / "wheels.txt")}
    assert names >= {"albumentations", "albucore", "pydantic", "pydantic-core", "annotated-types",
                     "typing-inspection", "stringzilla", "simsimd", "lightly", "timm"}


def test_every_section_row_is_a_case_that_step_impls_runs() -> None:
    from experiments.benchmarks import dex_rows, step_impls

    for name, (_, rows) in gpu_suite.SECTIONS.items():
        assert rows and len(set(rows)) == len(rows), name
        for row in rows:
            if row.impl in dex_rows.IMPLS:  # section D: DEX / MAE under the Trainer
                assert row.views == "mae" and not row.ckpt, row
                continue
            assert row.impl in step_impls.IMPLS and row.views in ("dino", "authors"), row
            if row.compile or row.ckpt:
                assert row.impl.startswith("midol"), row  # only PretrainModule has them
    assert all(r.views == "dino" for name in "BC" for r in gpu_suite.SECTIONS[name][1]
               if r.impl.startswith("midol"))


class _OomSuite:
    """Stands in for gpu_measure.Suite: the authors views run out of memory above batch 16."""

    def __init__(self, args) -> None:
        import torch

        self.torch, self.device, self.args = torch, torch.device("cpu"), args
        self.preset_name, self.has_lightly = "fake", False
        self.preset = type("P", (), {"backbone": "fake", "global_size": 32, "local_size": 16})
        self.tried: list[tuple[str, str, int]] = []

    def free(self) -> None:
        pass

    def time_row(self, row, batch: int) -> dict:
        self.tried.append((row.impl, row.views, batch))
        if row.views == "authors" and batch > 16:
            raise self.torch.OutOfMemoryError("CUDA out of memory (test)")
        return {"status": "ok", "images_per_s": float(batch), "images_per_s_min": 1.0,
                "images_per_s_max": 1.0, "step_ms": 1.0, "flops_per_image": 1e9,
                "tflops": 1.0, "mfu": 0.1, "mfu_measured_peak": 0.1, "peak_mem_gib": None}

    def audit_row(self, row, batch: int) -> dict:
        return {"status": "ok", "syncs_per_step": 1.0, "sync_sites": [], "audit": "test"}


def test_oom_halves_the_batch_and_later_rows_start_below_it(tmp_path: Path, monkeypatch) -> None:
    suites: list[_OomSuite] = []
    monkeypatch.setattr(gpu_section, "Suite", lambda args: suites.append(_OomSuite(args))
                        or suites[-1])
    args = gpu_suite.parse_args(["section", "A", "--device", "cpu", "--micro", "--out",
                                 str(tmp_path), "--batch", "64", "--no-check-flop-scaling"])
    assert gpu_suite.run_section(args) == 0
    tried = [t for t in suites[0].tried if t[1] == "authors"]
    # authors: 64 and 32 run out of memory, 16 runs; the other impls start at 16 at once.
    assert tried[:3] == [("authors", "authors", 64), ("authors", "authors", 32),
                         ("authors", "authors", 16)]
    assert all(b == 16 for _, _, b in tried[3:]) and len(tried) == 6
    rows = json.loads((tmp_path / "gpu_A.json").read_text())["rows"]
    assert [r["status"] for r in rows if r["impl"] == "authors"] == ["OOM", "OOM", "ok", "ok"]  # + its audit
    assert any("not tried: OOM at batch 32" in r.get("note", "") for r in rows)
    assert all(r["batch"] == 64 for r in rows if r["views"] == "dino")
    assert "| OOM |" in (tmp_path / "gpu_A.md").read_text()
