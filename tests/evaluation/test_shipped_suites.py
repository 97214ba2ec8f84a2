"""Every shipped suite parses; the sample and shared-data suites load every task with the
split sizes their split rules give."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from midol.evaluation.suite import load_suite, load_task

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "eval"
SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_suite_parses_with_written_split_rules(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # medmnist_plus skips the files absent here
        suite = load_suite(CONFIGS / name)
    assert suite.tasks and all(t.split_rule for t in suite.tasks)


def test_paper_template_lists_the_papers_classification_tasks():
    suite = load_suite(CONFIGS / "paper21.yaml")
    assert len(suite.tasks) == 20
    assert {t.name for t in suite.tasks if t.type == "multilabel"} == {"nih", "chexpert"}
    assert {t.name for t in suite.tasks if t.type == "ordinal"} == {"aptos", "glaucoma", "tvhl_dr"}


def test_sample_suite_loads():
    suite = load_suite(CONFIGS / "sample_data.yaml")
    sizes = {t.name: {k: len(v) for k, v in load_task(t, suite.data_root).splits.items()}
             for t in suite.tasks}
    assert sizes == {"xray_pneumonia": {"train": 42, "test": 18}, "oct4": {"train": 8, "test": 8},
                     "retina_grade": {"train": 141, "test": 59}}


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the repository")
def test_shared_suite_loads_every_task_with_patients_kept_apart():
    suite = load_suite(CONFIGS / "shared_data.yaml")
    assert len(suite.tasks) == 9
    for spec in suite.tasks:
        task = load_task(spec, suite.data_root)
        train, test = task.groups["train"], task.groups["test"]
        if train is not None:
            assert test is not None and not set(train.tolist()) & set(test.tolist())
    nih = load_task(next(t for t in suite.tasks if t.name == "nih_normal_abnormal"), suite.data_root)
    assert {k: len(v) for k, v in nih.splits.items()} == {"train": 581, "test": 219}
