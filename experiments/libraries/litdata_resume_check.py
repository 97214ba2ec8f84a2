"""A closer look at litdata's resume (``loader_compare.py`` found the resumed order different):
two sources of real images written with ``optimize`` (4-item chunks), a weighted
``CombinedStreamingDataset`` read by ``StreamingDataLoader`` with 0 and with 2 workers; stop
after 3 batches, ``state_dict()``, a new loader ``load_state_dict()``, read on. Reports whether
the resumed indices equal an uninterrupted pass, and the pass lengths.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/libraries/litdata_resume_check.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.libraries.common import load_average, need_shared_data  # noqa: E402

BATCH, STOP = 4, 3


def _item(arg: tuple[int, str]) -> dict[str, Any]:
    index, path = arg
    return {"index": index, "data": Path(path).read_bytes()}


def collate(items: list[dict[str, Any]]) -> dict[str, list[int]]:
    return {"index": [int(x["index"]) for x in items]}  # the bytes differ in length: not stacked


def loader(dirs: list[str], workers: int, iterate_over_all: bool) -> Any:
    from litdata import CombinedStreamingDataset, StreamingDataLoader, StreamingDataset

    datasets = [StreamingDataset(d, shuffle=True, seed=0) for d in dirs]
    # weights only without iterate_over_all (litdata refuses both: it then weighs by size)
    combined = CombinedStreamingDataset(datasets, seed=0, weights=None if iterate_over_all else [0.5, 0.5],
                                        iterate_over_all=iterate_over_all)
    return StreamingDataLoader(combined, batch_size=BATCH, num_workers=workers, collate_fn=collate)


def indices(batches: list[Any]) -> list[int]:
    return [int(i) for b in batches for i in b["index"]]


def main() -> int:
    from litdata import optimize

    warnings.simplefilter("ignore")
    root = need_shared_data()
    sources = [sorted((root / "histopathology/crc_he_tissue_9class").rglob("*.*"))[:24],
               sorted((root / "oct/octdl_amd_vid_samples").rglob("*.*"))[:12]]
    report: dict[str, Any] = {"load_before": load_average(), "sizes": [len(s) for s in sources]}
    with tempfile.TemporaryDirectory(prefix="litdata_check_") as work:
        dirs, offset = [], 0
        start = time.perf_counter()
        for k, files in enumerate(sources):
            items = [(offset + i, str(p)) for i, p in enumerate(files)]
            offset += len(files)
            out = str(Path(work) / f"s{k}")
            optimize(fn=_item, inputs=items, output_dir=out, chunk_size=4, num_workers=1, verbose=False)
            dirs.append(out)
        report["optimize_s"] = time.perf_counter() - start
        for workers in (0, 2):
            for over_all in (False, True):
                full = indices(list(loader(dirs, workers, over_all)))
                first = loader(dirs, workers, over_all)
                head, it = [], iter(first)
                for _ in range(STOP):
                    head.append(next(it))
                state = first.state_dict()
                del it
                second = loader(dirs, workers, over_all)
                second.load_state_dict(state)
                resumed = indices(head) + indices(list(second))
                report[f"workers={workers}, iterate_over_all={over_all}"] = {
                    "pass_length": len(full), "resumed_length": len(resumed),
                    "exact_resume": resumed == full,
                    "first_mismatch": next((k for k, (a, b) in enumerate(zip(resumed, full)) if a != b), None),
                }
    report["load_after"] = load_average()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
