"""Issue 28 items 1 and 3, measured: per-group sampling weights on real images, and what the
slice policies cost at scan time (headers only) against decoding the listed slices.

Usage: ``python experiments/benchmarks/bench_source_groups.py --out experiments/results/source_groups_cpu.md``
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.benchmarks.common import header  # noqa: E402
from midol.data.corpus import Corpus  # noqa: E402
from midol.data.sampler import WeightedSourceSampler  # noqa: E402
from midol.data.sources import DataSource, resolve_source, source_table  # noqa: E402

SAMPLE_DATA = Path(__file__).resolve().parents[2] / "sample_data"
SIZES = {"A": 1, "B": 10, "C": 100}


def patients_csv(folder: Path) -> Path:
    """3 patients holding 1, 10 and 100 distinct real images of the bundled sample corpus."""
    images = [p for name in ("xray", "pathology", "oct")
              for p in resolve_source(DataSource(str(SAMPLE_DATA / name), name)).paths or []]
    path = folder / "patients.csv"
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["path", "patient_id"])
        k = 0
        for patient, n in SIZES.items():
            for _ in range(n):
                out.writerow([images[k], patient])
                k += 1
    return path


def share_rows(path: Path, draws: int, seeds: int) -> list[str]:
    corpus = Corpus([DataSource(str(path), "mixed", group_by="patient_id")])
    keys = corpus.sources[0].group_keys() or []
    rows = []
    for grouped in (True, False):
        shares: dict[str, list[float]] = {p: [] for p in SIZES}
        for seed in range(seeds):
            sampler = WeightedSourceSampler(corpus.source_ids, [1.0], num_samples=draws, seed=seed,
                                            group_ids=corpus.group_ids if grouped else None)
            counts = Counter(keys[i] for i in sampler)
            for p in SIZES:
                shares[p].append(counts[p] / draws)
        for p, n in SIZES.items():
            expected = 1 / 3 if grouped else n / sum(SIZES.values())
            s = shares[p]
            rows.append(f"| {'patient_id' if grouped else 'none'} | {p} | {n} | {expected:.4f} | "
                        f"{statistics.mean(s):.4f} | {min(s):.4f}-{max(s):.4f} |")
    return rows


def timed(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def scan_rows(repeats: int) -> list[str]:
    import nibabel
    import pydicom

    volume = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
    dicoms = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files", "dicomdirtests")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(volume, os.path.join(tmp, "anatomical.nii"))
        cases = [
            ("anatomical.nii (nibabel), slices: all", DataSource(tmp, "mr", slices="all")),
            ("anatomical.nii (nibabel), slices: {stack: 3}", DataSource(tmp, "mr", slices={"stack": 3})),
            ("dicomdirtests (pydicom, 31 files), group_by: series",
             DataSource(dicoms, "mixed", include=["7*/*", "9*/*"], group_by="series")),
        ]
        for name, source in cases:
            items = resolve_source(source)
            scan = timed(lambda s=source: resolve_source(s), repeats)
            load = timed(lambda it=items: [it.load(i) for i in range(len(it))], repeats)
            rows.append(f"| {name} | {len(items)} | {scan * 1e3:.1f} | {load * 1e3:.1f} | "
                        f"{load / len(items) * 1e3:.2f} |")
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--draws", type=int, default=30_000)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines = header("Per-group sampling weights and slice policies (issue 28 items 1, 3)",
                   torch.device("cpu"), ["experiments/benchmarks/bench_source_groups.py", *argv])
    lines.insert(-1, f"* machine: {os.cpu_count()}-core CPU, shared with other sessions (timings are noisy; "
                     "the shares do not depend on the machine)")
    with tempfile.TemporaryDirectory() as tmp:
        path = patients_csv(Path(tmp))
        corpus = Corpus([DataSource(str(path), "mixed", group_by="patient_id")])
        lines += ["## Equal shares per patient",
                  "",
                  f"3 patients with 1, 10 and 100 distinct real images of `sample_data/` (xray, pathology, "
                  f"oct) in one CSV source; {args.draws:,} draws of `WeightedSourceSampler` per seed, "
                  f"seeds 0-{args.seeds - 1}; share = draws of the patient's images / draws. "
                  f"One binomial standard deviation at p = 1/3: {((1 / 3) * (2 / 3) / args.draws) ** 0.5:.4f}.",
                  "",
                  "| group_by | patient | images | expected share | mean share | range over seeds |",
                  "|---|---|---:|---:|---:|---:|",
                  *share_rows(path, args.draws, args.seeds),
                  "",
                  "The start-up table of that source (`source_table`):",
                  "",
                  source_table([DataSource(str(path), "mixed", group_by="patient_id")], [len(corpus)],
                               corpus.group_counts).replace(tmp, "<tmp>"),
                  ""]
    lines += ["## Scan (headers only) against decoding every listed item",
              "",
              f"median of {args.repeats}; one process, 1 torch thread",
              "",
              "| source | items | scan ms | decode all items ms | decode ms / item |",
              "|---|---:|---:|---:|---:|",
              *scan_rows(args.repeats), ""]
    text = "\n".join(lines)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
