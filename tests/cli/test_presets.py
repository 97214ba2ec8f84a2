"""Preset composition (``base:``) and the presets' resolved configs.

Every preset's ``--print_config`` must equal what midol 0.1.0 (commit f90bd5f) printed for it
(``tests/fixtures/print_config``), up to this documented list of renames and new options:

* ``data.init_args.{global,local}_{size,scale}``, ``num_global``, ``num_local`` moved into
  ``data.init_args.transform`` (a ``MultiCropTransform``, which can now be replaced);
* ``midol.methods.PretrainModule`` is ``midol.methods.MIDoL`` (the old name is an alias);
* ``midol.methods.<Task>Module`` is ``midol.tasks.<Task>Module`` (``TASKS``);
* ``midol.callbacks.ExportTeacherBackbone`` is ``midol.callbacks.ExportBackbone`` (the old name
  still loads, with a DeprecationWarning: ``test_old_callback_name_loads_and_warns``);
* ``init_prefix: teacher.backbone.`` (the old default) is ``init_part: null`` (the method's
  first export, the teacher);
* checkpoint ``dirpath`` / export ``dirpath`` equal to the run folder are left null and filled
  from ``trainer.default_root_dir`` (checked on the instantiated callbacks below);
* every preset's ``ModelCheckpoint`` writes ``last.ckpt`` at each epoch end (0.1.0's
  ``save_last: true, save_top_k: 0`` wrote nothing until the run ended): the fixtures'
  checkpoint entries were updated to the new settings, and nothing else in them;
* every preset has a ``PreemptionCheckpoint`` at its defaults (issue 26 item 5:
  ``preemption_entry``), the fine-tune and MedMIX presets and two pre-training ones gained it;
* new options with their defaults (the values that reproduce 0.1.0): ``NEW_OPTIONS``;
* LightningCLI's ``optimizer`` / ``lr_scheduler`` (null in 0.1.0) are gone: ``REMOVED_OPTIONS``;
* the Swin-B pre-training presets pick the fast settings for the hardware (issue 12):
  ``SWIN_B_SPEED`` (compile and activation checkpointing ``auto``, the non-finite flag read
  one step late);
* ``midol_authors_code`` deliberately changed to the released code's values
  (``AUTHORS_CODE_CHANGES``, the M-IDoL fidelity issue).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import pytest
import yaml

from midol.cli import main, run_lightning
from midol.config_compose import load_composed, merge

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "print_config"
MOVED = ("global_size", "local_size", "num_global", "num_local", "global_scale", "local_scale")
NEW_OPTIONS = {  # key suffix -> default that keeps the 0.1.0 behaviour
    "init_args.teacher_mode": "eval", "init_args.lr_batch_size": 256,
    "init_args.clip_mode": "global", "init_args.idle_repeat_epochs": 5,
    "init_args.parts": None, "init_args.init_part": None, "init_args.sinkhorn_impl": "swav",
    "init_args.gate_noise": 0.0, "init_args.router_bias": True, "init_args.grad_norm_every": 0,
    "init_args.select_metric": "dice", "init_args.dex_mode": None, "init_args.decoder_type": "fpn",
    "transform.class_path": "midol.data.MultiCropTransform", "transform.init_args.seed": None,
    ".include": None, ".exclude": [], ".bits": None,  # per-source globs and bit depth (sources[i])
    "init_args.nonfinite_check": "every_step", "init_args.fused_attn": None,
    "init_args.route_backbone_grad": True, "init_args.max_images": None,
    "init_args.infonce_gather": "float32",
    # continued pre-training (issue 29 item 1): the file's key layout and the share that must load
    "init_args.init_layout": "auto", "init_args.min_loaded": 0.95,
    # per-source intensity, windows, slices and draw units (issue 28 item 1; sources[i])
    ".intensity": "auto", ".window": None, ".slices": "middle", ".group_by": None,
}
SWIN_B_SPEED = {
    "model.init_args.compile": "auto", "model.init_args.grad_checkpointing": "auto",
    "model.init_args.nonfinite_check": "one_step_late",
}


# LightningCLI's own --optimizer / --lr_scheduler: 0.1.0 printed them (null); midol no longer
# offers them, since its modules build their own optimiser groups and schedules.
REMOVED_OPTIONS = ("optimizer", "lr_scheduler")
# the task modules moved to midol.tasks (the midol.methods names still load, with a warning)
TASKS = ("ClassificationModule", "FinetuneModule", "MultiLabelModule", "SegmentationModule")

AUTHORS_CODE_CHANGES = {
    "model.init_args.num_experts": 4, "model.init_args.top_k": 4,
    "model.init_args.sinkhorn_impl": "authors", "model.init_args.clip_mode": "per_param",
    "model.init_args.betas": [0.9, 0.999], "model.init_args.teacher_mode": "train",
    "model.init_args.gate_noise": 1.0, "model.init_args.router_bias": False,
    "data.init_args.transform.init_args.num_local": 2,
}


def flat(d: Any, pre: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flat(v, f"{pre}.{k}" if pre else k))
    elif isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        for i, v in enumerate(d):
            out.update(flat(v, f"{pre}[{i}]"))
    else:
        out[pre] = d
    return out


def old_in_new_terms(old: dict[str, Any]) -> dict[str, Any]:
    mapped = {}
    for key, value in old.items():
        head, _, leaf = key.rpartition(".")
        if head == "data.init_args" and leaf in MOVED:
            key = f"data.init_args.transform.init_args.{leaf}"
        if key == "model.class_path" and value == "midol.methods.PretrainModule":
            value = "midol.methods.MIDoL"
        if value == "midol.callbacks.ExportTeacherBackbone":
            value = "midol.callbacks.ExportBackbone"
        if isinstance(value, str) and value.startswith("midol.methods.") and value.endswith(TASKS):
            value = value.replace("midol.methods.", "midol.tasks.")
        if key == "model.init_args.init_prefix" and value == "teacher.backbone.":
            value = None
        mapped[key] = value
    return null_run_folders(mapped)


ADDED_CALLBACKS = {  # callbacks presets gained since 0.1.0, with the settings they have there
    # every preset: SIGTERM -> last.ckpt (issue 26 item 5)
    "midol.callbacks.PreemptionCheckpoint": {"dirpath": None, "filename": "last"},
    # the Swin-B / ViT-B presets end with the summary the demo has (issue 27 item 11)
    "midol.callbacks.PretrainSummary": {"output_dir": None, "progress": True, "max_images": 20000},
    # ... and measure how long they wait for data (issue 30 item 3)
    "midol.callbacks.DataWaitMonitor": {"window": 50, "warn_fraction": 0.1},
}


def preemption_entry(config: dict[str, Any], key: str) -> bool:
    """A key of a callback in ``ADDED_CALLBACKS``, at its listed settings."""
    head = key.split("].")[0] + "]"
    settings = ADDED_CALLBACKS.get(config.get(f"{head}.class_path", ""))
    if settings is None:
        return False
    return key == f"{head}.class_path" or config[key] == settings.get(key.rsplit(".", 1)[-1], "<not listed>")


def null_run_folders(config: dict[str, Any]) -> dict[str, Any]:
    """Output folders equal to the run folder (or its checkpoints/) as null: the same run."""
    root = config.get("trainer.default_root_dir")
    return {k: None if k.endswith("init_args.dirpath") and v in (root, f"{root}/checkpoints")
            else v for k, v in config.items()}


def print_config(config: Path) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config), "--print_config"])
    assert exc.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize("fixture", sorted(FIXTURES.glob("*.yaml")), ids=lambda p: p.stem)
def test_preset_resolves_to_what_0_1_0_printed(fixture: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    config = REPO / "configs" / (fixture.stem.replace("__", "/") + ".yaml")
    new = null_run_folders(flat(print_config(config)))
    old = old_in_new_terms(flat(yaml.safe_load(fixture.read_text())))
    if "_seg" in fixture.stem and "paper" in fixture.stem:  # the paper's Dice selects
        old["trainer.callbacks[0].init_args.monitor"] = "val/dice_per_image"
        old["model.init_args.select_metric"] = "dice_per_image"
    for removed in REMOVED_OPTIONS:  # never part of a midol recipe (they were ignored)
        assert old.pop(removed, None) is None
    if fixture.stem == "pretrain__midol_authors_code":
        old.update({k: v for k, v in AUTHORS_CODE_CHANGES.items() if k in old})
        new = {k: v for k, v in new.items() if k not in AUTHORS_CODE_CHANGES or k in old}
        assert all(new_value == AUTHORS_CODE_CHANGES[k] for k, new_value in
                   flat(print_config(config)).items() if k in AUTHORS_CODE_CHANGES)
    if new.get("model.init_args.backbone") == "swin_base_patch4_window7_224" and "pretrain" in fixture.stem:
        assert {k: new.get(k) for k in SWIN_B_SPEED} == SWIN_B_SPEED
        old.update({k: v for k, v in SWIN_B_SPEED.items() if k in old})
        new = {k: v for k, v in new.items() if k not in SWIN_B_SPEED or k in old}
    changed = {k: (old[k], new.get(k, "<missing>")) for k in old if new.get(k, "<missing>") != old[k]}
    assert changed == {}
    added = {k: v for k, v in new.items() if k not in old}
    added = {k: v for k, v in added.items() if not preemption_entry(new, k)}
    unexplained = {k: v for k, v in added.items()
                   if not any(k.endswith(s) and v == d for s, d in NEW_OPTIONS.items())}
    assert unexplained == {}


def test_null_checkpoint_folders_are_filled_from_the_run_folder(monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    cli = run_lightning(["--config", "configs/pretrain/midol_fast.yaml", "--trainer.accelerator",
                         "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"], run=False)
    from lightning.pytorch.callbacks import ModelCheckpoint

    dirs = {c.dirpath for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)}
    assert dirs == {str(Path("outputs/midol_fast/checkpoints").resolve())}
    assert cli.datamodule.transform.local_size == 96  # the preset's one change of the views
    assert cli.datamodule.transform.global_size == 224  # from its base


def test_merge_rules_and_errors(tmp_path: Path) -> None:
    base = {"a": {"x": 1, "y": [1, 2]}, "m": {"class_path": "A", "init_args": {"p": 1, "q": 2}}}
    over = {"a": {"y": [3]}, "m": {"init_args": {"q": 5}}, "n": 0}
    assert merge(base, over) == {"a": {"x": 1, "y": [3]}, "n": 0,
                                 "m": {"class_path": "A", "init_args": {"p": 1, "q": 5}}}
    # another class takes other arguments: its mapping replaces the base's whole
    assert merge(base, {"m": {"class_path": "B"}})["m"] == {"class_path": "B"}
    (tmp_path / "a.yaml").write_text("base: [b.yaml]\nk: 1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nk: 2\n")
    with pytest.raises(ValueError, match="config base cycle: a.yaml -> b.yaml -> a.yaml"):
        load_composed(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: [missing.yaml]\n")
    with pytest.raises(FileNotFoundError, match="missing.yaml.*base of"):
        load_composed(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: [e.yaml]\nk: {v: 1}\n")
    (tmp_path / "e.yaml").write_text("k: {v: 0, w: 2}\nz: 3\n")
    assert load_composed(tmp_path / "d.yaml") == {"k": {"v": 1, "w": 2}, "z": 3}


def test_old_callback_name_loads_and_warns(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    text = (REPO / "configs/pretrain/demo.yaml").read_text()
    assert "ExportBackbone" in text and "ExportTeacherBackbone" not in text
    old = tmp_path / "old.yaml"
    old.write_text(text.replace("midol.callbacks.ExportBackbone", "midol.callbacks.ExportTeacherBackbone"))
    with pytest.warns(DeprecationWarning, match=r"ExportTeacherBackbone moved to .*ExportBackbone in midol 0\.2; the old name goes in 0\.4"):
        cli = run_lightning(["--config", str(old), "--trainer.default_root_dir", str(tmp_path / "run")], run=False)
    from midol.callbacks import ExportBackbone

    assert sum(isinstance(c, ExportBackbone) for c in cli.trainer.callbacks) == 1


def every_preset() -> list[Path]:
    """The presets a user runs (bases ``_*.yaml``, eval suites and W&B sweep specs are not fit configs)."""
    return sorted(p for p in (REPO / "configs").rglob("*.yaml")
                  if not p.name.startswith("_")
                  and not {"eval", "sweeps"} & set(p.relative_to(REPO / "configs").parts))


@pytest.mark.parametrize("preset", every_preset(), ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_preset_writes_a_resumable_checkpoint_on_sigterm(preset: Path) -> None:
    """Issue 26 item 5: fine-tune and MedMIX presets exited 0 on SIGTERM with no checkpoint;
    every preset now has a PreemptionCheckpoint (exit 143, last.ckpt)."""
    callbacks = load_composed(preset).get("trainer", {}).get("callbacks") or []
    paths = [c.get("class_path") for c in callbacks if isinstance(c, dict)]
    assert paths.count("midol.callbacks.PreemptionCheckpoint") == 1, paths


KNN = {"class_path": "midol.callbacks.KNNMonitor", "init_args": {"image_size": 64, "sets": [
    {"name": "oct", "train": {"path": "sample_data/oct"}, "test": {"path": "sample_data/oct"}}]}}


def test_a_derived_preset_adds_replaces_and_drops_callbacks_by_name(tmp_path: Path, monkeypatch) -> None:
    """Issue 27 item 2: adding one callback in a derived config dropped all of the preset's
    (no last.ckpt, no export, no pre-emption checkpoint), with no warning."""
    monkeypatch.chdir(REPO)
    demo = load_composed(REPO / "configs/pretrain/demo.yaml")["trainer"]["callbacks"]
    derived = tmp_path / "mine.yaml"
    derived.write_text(yaml.safe_dump({
        "base": [str(REPO / "configs/pretrain/demo.yaml")],
        "trainer": {"callbacks": {"knn": KNN, "routing_monitor": None,
                                  "model_checkpoint_2": {"init_args": {"every_n_train_steps": 7}}}}}))
    composed = load_composed(derived)["trainer"]["callbacks"]
    names = [c["class_path"].rsplit(".", 1)[-1] for c in composed]
    assert names == ["ModelCheckpoint", "ModelCheckpoint", "PreemptionCheckpoint", "ExportBackbone",
                     "PretrainSummary", "KNNMonitor"]
    assert composed[1]["init_args"]["every_n_train_steps"] == 7 and composed[1]["init_args"]["save_last"]
    assert composed[0] == demo[0] and composed[-1] == KNN
    cli = run_lightning(["--config", str(derived), "--trainer.default_root_dir", str(tmp_path / "run")],
                        run=False)
    kinds = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"ModelCheckpoint", "PreemptionCheckpoint", "ExportBackbone", "KNNMonitor"} <= kinds
    assert "RoutingMonitor" not in kinds


def test_a_derived_callbacks_list_replaces_the_base_with_a_warning(tmp_path: Path) -> None:
    derived = tmp_path / "mine.yaml"
    derived.write_text(yaml.safe_dump({"base": [str(REPO / "configs/pretrain/demo.yaml")],
                                       "trainer": {"callbacks": [KNN]}}))
    with pytest.warns(UserWarning, match=r"replaces the base's, dropping model_checkpoint, "
                                         r"model_checkpoint_2, preemption_checkpoint, export_backbone"):
        composed = load_composed(derived)["trainer"]["callbacks"]
    assert composed == [KNN]


def test_a_root_set_in_a_derived_yaml_moves_every_output(tmp_path: Path, monkeypatch) -> None:
    """Issue 27 item 1: a copy of the demo preset that set trainer.default_root_dir moved the
    checkpoints and export, but its logs, heat-maps, routing table and summary still went to
    outputs/demo/ (and overwrote the demo's). A fit of one epoch writes every file under the new
    root and nothing under outputs/demo."""
    import os

    from midol.cli import main

    monkeypatch.chdir(REPO)
    run = tmp_path / "my_run"
    derived = tmp_path / "mine.yaml"
    derived.write_text(yaml.safe_dump({"base": [str(REPO / "configs/pretrain/demo.yaml")],
                                       "trainer": {"default_root_dir": str(run), "max_epochs": 1}}))
    composed = flat(load_composed(derived))
    outputs = {k: v for k, v in composed.items()
               if k.rsplit(".", 1)[-1] in ("save_dir", "image_dir", "output_dir", "dirpath", "default_root_dir")
               and v is not None}
    assert outputs and all(str(v).startswith(str(run)) for v in outputs.values()), outputs

    def snapshot(folder: Path) -> dict[str, float]:
        return {str(p): p.stat().st_mtime for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}

    demo_before = snapshot(REPO / "outputs" / "demo")
    assert main(["fit", "--config", str(derived), "--data.init_args.num_workers", "0", "--threads", "1"]) == 0
    assert snapshot(REPO / "outputs" / "demo") == demo_before
    written = {os.path.relpath(p, run) for p in snapshot(run)}
    assert {"checkpoints/last.ckpt", "teacher_backbone.safetensors", "summary.json",
            "routing_table.md"} <= written
    assert any(w.startswith("logs/") and w.endswith("metrics.csv") for w in written)
    assert any(w.startswith("routing/") for w in written)
