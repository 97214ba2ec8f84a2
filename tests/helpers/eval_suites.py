"""``midol eval`` on the bundled sample images: a two-task suite file and fast settings."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.helpers.tiny import SAMPLE_DATA

FAST = ["--seeds", "2", "--bootstrap", "200", "--shots", "1,5", "--fractions", "0.2",
        "--threads", "1"]


def two_task_suite(tmp: Path, extra: dict | None = None) -> Path:
    """``tmp/suite.yaml``: X-ray (binary) and RetinaMNIST (ordinal), plus ``extra`` if given."""
    tasks = [
        {"name": "xray", "modality": "xray", "type": "binary", "train": {"path": "xray"},
         "test_fraction": 0.3, "split_rule": "30 % seeded"},
        {"name": "retina", "modality": "fundus", "type": "ordinal",
         "train": {"path": "fundus_retinamnist.npz", "split": "train"}, "test_fraction": 0.3},
    ]
    if extra:
        tasks.append(extra)
    path = tmp / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": "two-task", "data_root": str(SAMPLE_DATA), "tasks": tasks}))
    return path
