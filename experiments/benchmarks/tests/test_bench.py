"""The benchmark harness (experiments/benchmarks) runs on a CPU with the smallest Swin, counts
the same FLOPs for the same math whatever the loop, and finds the host syncs of the step."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from experiments.benchmarks import bench_pipeline, bench_step

BENCH = Path(__file__).resolve().parents[1]

HAS_LIGHTLY = importlib.util.find_spec("lightly") is not None


ARGS = ["--device", "cpu", "--model", "micro", "--batch", "2", "--compile", "off", "--ckpt", "off",
        "--warmup", "1", "--iters", "1", "--repeats", "1", "--threads", "1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two OpenMP threads on two shared, busy cores spin against each other (milliseconds per
    # tiny op); one thread is also what the harness uses for CPU timings (--threads 1).
    threads = bench_step.torch.get_num_threads()
    bench_step.torch.set_num_threads(1)
    yield
    bench_step.torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def step_results(one_thread) -> tuple[list, str]:
    impls = ["midol", "authors"] + (["lightly"] if HAS_LIGHTLY else [])
    args = bench_step.parse_args(ARGS + ["--views", "dino", "authors", "--impl", *impls,
                                         "--sync-audit"])
    args.views = ["dino"]  # midol and lightly in the DINO setting; authors in theirs (below)
    results = bench_step.run(args)
    args.views, args.impl, args.sync_audit = ["authors"], ["authors"], False
    results += bench_step.run(args)
    return results, bench_step.report(results, args, (1.0, "test", 1.0))


@pytest.mark.timeout(180)
def test_step_harness_runs_every_implementation(step_results) -> None:
    results, text = step_results
    assert all(r.status == "ok" for r in results), [(r.case, r.status) for r in results]
    assert {r.case.impl for r in results} >= {"midol", "authors"}
    assert all(r.step_s and r.step_s[0] > 0 and r.flops_per_step > 0 for r in results)
    assert "| midol | dino | 2 | off | off |" in text and "MFU" in text
    assert "in the dino setting / authors' step in theirs (batch 2)" in text


@pytest.mark.timeout(180)
def test_flops_depend_on_the_math_not_on_the_loop(step_results) -> None:
    results, _ = step_results
    args = bench_step.parse_args(ARGS + ["--impl", "midol", "authors"])  # lightly is optional
    cpu = bench_step.torch.device("cpu")
    count = lambda impl, views: bench_step.count_flops(  # noqa: E731
        bench_step.Case(impl, views, 2), args, cpu)
    authors = next(r.flops_per_step for r in results if r.case.impl == "authors")
    # The authors' per-view fp16 loop and midol's grouped step do the same math.
    assert authors == pytest.approx(count("midol-dinoce", "authors"), rel=1e-3)
    # 6 local views at 16 px instead of 32 px: fewer FLOPs, but more than the global views'.
    midol_dino = next(r.flops_per_step for r in results if r.case.impl == "midol")
    assert 0.25 < midol_dino / count("midol", "authors") < 0.8


def test_sync_audit_finds_no_unintended_sync_in_the_module(step_results) -> None:
    results, _ = step_results
    audited = [r for r in results if r.syncs_per_step is not None]
    assert audited
    for r in audited:
        sites = "\n".join(r.sync_sites)
        module_sites = [s for s in r.sync_sites if "methods/" in s]
        assert module_sites, sites  # the audit sees the method's frames (not a vacuous filter)
        # The non-finite check reads one bool per step on purpose; nothing else in the module
        # (no bincount, no float logging, no progress-bar read-back) may sync. The one allowed
        # exception is torch's own non-fused AdamW on CPU, which reads every parameter's step
        # counter inside optimizer.step (on CUDA midol uses fused AdamW: no read-back).
        unexpected = [s for s in module_sites if "check_finite" not in s
                      and not (s.rstrip().endswith("optimizer_step") and "cpu" in ARGS)]
        assert not unexpected, sites
        # The losses need no host read-back either (pair counts are known on the host, expert
        # counts use index_add_, no boolean-mask indexing).
        assert not [s for s in r.sync_sites if "losses/" in s], sites
        assert "[lightning" not in sites, sites


def test_pipeline_harness_compares_the_three_pipelines(tmp_path: Path) -> None:
    pipes = ["ours", "torchvision"] + (["lightly"] if HAS_LIGHTLY else [])
    out = tmp_path / "pipe.md"
    text = bench_pipeline.main([
        "--pipelines", *pipes, "--views", "dino", "--modes", "transform", "--per-set", "1",
        "--repeats", "1", "--out", str(out),
    ])
    assert out.read_text() == text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "img/s" not in line]
    assert len(rows) == len(pipes)
    assert "| ours | dino | transform |" in text and "uint8" in text and "float32" in text
