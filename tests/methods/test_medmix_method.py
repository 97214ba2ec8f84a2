"""MedMIX end to end on real ODIR patients with tiny random experts: fit, checkpoint round trip,
cached features, training-split statistics, the one-input drop, the deployable export without
the teacher path, and the robustness report."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from midol.analysis.robustness import Protocols, evaluate, write_report
from midol.data.feature_cache import FeatureCache
from midol.fusion.experts import encoder_key
from midol.fusion.export import export_deployable, inference_cost, load_deployable
from midol.fusion.module import MedMIX
from midol.fusion.patient_features import patient_batch
from midol.methods.loading import load_method
from tests.helpers.medmix import ODIR, datamodule, medmix, odir_subset

pytestmark = pytest.mark.skipif(not (ODIR / "patients.csv").is_file(), reason="ODIR patients not found")


def trainer(tmp_path: Path, epochs: int = 2) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(tmp_path),
                     enable_checkpointing=False, num_sanity_val_steps=0)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("medmix")
    manifest = odir_subset(tmp)
    dm = datamodule(manifest)
    L.seed_everything(0)
    model = medmix(tmp / "cache", train_drop_rate=0.2, aux_heads=True)
    t = trainer(tmp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny val split: undefined labels
        t.fit(model, datamodule=dm)
    ckpt = tmp / "medmix.ckpt"
    t.save_checkpoint(ckpt)
    return {"tmp": tmp, "manifest": manifest, "dm": dm, "model": model, "trainer": t, "ckpt": ckpt}


def test_fit_trains_on_cached_features_and_logs_macro_auc(fitted):
    model, t = fitted["model"], fitted["trainer"]
    metrics = t.callback_metrics
    assert torch.isfinite(metrics["train/l_task_epoch"]) and torch.isfinite(metrics["train/l_distill_epoch"])
    assert 0.0 <= float(metrics["train/auc"]) <= 1.0
    assert "val/loss" in metrics
    # batches carried no pixels: the model read its features from the cache
    assert fitted["dm"].load_images is False
    table = model.table
    assert model.features.experts["left_fundus"][0].shape == (len(table.patient_ids), 48)
    assert model.features.experts["left_fundus"][1].shape == (len(table.patient_ids), 32)
    # absent eyes are absent, not zero rows
    absent = ~torch.as_tensor(table.present[:, 0])
    assert absent.any() and torch.isnan(model.features.experts["left_fundus"][0][absent]).all()


def test_second_setup_reuses_the_cache(fitted):
    model, table = fitted["model"], fitted["model"].table
    spec = model.expert_specs["fundus"][0]
    cache = FeatureCache(model.hparams.cache_dir)
    called = []
    result = cache.features(lambda x: called.append(x) or torch.zeros(len(x), 48), encoder_key(spec),
                            table.image_files("left_fundus"), lambda a: torch.zeros(3, 32, 32, dtype=torch.uint8),
                            "EvalTransform(32)")
    assert result.computed == 0 and not called
    torch.testing.assert_close(result.features, model.features.experts["left_fundus"][0], equal_nan=True)


def test_tabular_statistics_come_from_training_rows_only(fitted):
    model = fitted["model"]
    with open(fitted["manifest"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    train_ages = np.array([float(r["age"]) for r in rows if r["split"] == "train"])
    encoder = model.net.tabular["demographics"]
    assert encoder.mean.item() == pytest.approx(train_ages.mean(), rel=1e-5)
    assert encoder.std.item() == pytest.approx(train_ages.std(), rel=1e-5)
    all_ages = np.array([float(r["age"]) for r in rows])
    assert abs(all_ages.mean() - train_ages.mean()) > 1e-3  # the test would notice a leak


def test_checkpoint_round_trip_rebuilds_the_same_model(fitted):
    model = fitted["model"]
    rebuilt = load_method(fitted["ckpt"])
    assert isinstance(rebuilt, MedMIX) and rebuilt.net is not None
    dm = datamodule(fitted["manifest"])
    dm.setup("test")
    rebuilt.attach(dm, fit=False)
    rows = model.table.rows("test")
    torch.testing.assert_close(rebuilt.predict_rows(rows), model.predict_rows(rows))
    # tabular statistics come back from the checkpoint, not from refitting
    assert rebuilt.net.tabular["demographics"].mean.item() == pytest.approx(
        model.net.tabular["demographics"].mean.item())


def test_rebuilt_model_refuses_data_of_another_shape(fitted):
    rebuilt = load_method(fitted["ckpt"])
    dm = datamodule(fitted["manifest"], label_columns=["N", "D", "G"])
    dm.setup("test")
    with pytest.raises(ValueError, match="label_names"):
        rebuilt.attach(dm)


def test_teacher_is_not_in_the_state_dict_and_not_exported(fitted, tmp_path):
    model = fitted["model"]
    keys = list(model.state_dict())
    assert any(k.startswith("projections.") for k in keys)  # P_m trains ...
    assert not any("teacher" in k for k in keys)  # ... the teacher itself is never a module
    path = export_deployable(model, tmp_path / "export")
    deployed = load_deployable(path)
    exported = [k for k in deployed.state_dict()]
    assert not any(k.startswith("projections") or "teacher" in k for k in exported)
    meta = json.loads(path.with_suffix(".json").read_text())
    params = sum(p.numel() for p in model.experts.parameters()) + sum(p.numel() for p in model.net.parameters())
    assert meta["parameters"] == params == sum(p.numel() for p in deployed.parameters())
    with pytest.raises(FileExistsError):
        export_deployable(model, tmp_path / "export")


def test_deployable_on_pixels_equals_the_cached_training_path(fitted):
    model = fitted["model"]
    deployed = model.deployable().eval()
    table = model.table
    dm = datamodule(fitted["manifest"], load_images=True)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    inputs = {"left_fundus": batch["image"]["left_fundus"], "right_fundus": batch["image"]["right_fundus"],
              "demographics": batch["tabular"]["demographics"]}
    with torch.no_grad():
        pixels = deployed(inputs, batch["present"])
        cached = model.eval()(patient_batch(table, batch["index"]))
    torch.testing.assert_close(pixels, cached, rtol=1e-4, atol=1e-4)


def test_inference_cost_counts_the_teacher_path_separately(fitted):
    model = fitted["model"]
    cost = inference_cost(model, patients=8, batch_size=4, repeats=1)
    projections = sum(p.numel() for p in model.projections.parameters())
    assert cost["training_only_parameters"] > projections > 0  # teacher backbone + P_m
    assert cost["deployable_parameters"] == sum(p.numel() for p in model.deployable().parameters())
    assert cost["deployable_patients_per_s"] > 0 and cost["with_teacher_patients_per_s"] > 0


def test_robustness_report_on_the_same_masks(fitted, tmp_path):
    model = fitted["model"]
    rows = model.table.rows("test")
    protocols = Protocols(rates=(0.0, 0.3, 0.6), seeds=(0, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = evaluate(model, "medmix", rows, protocols)
        again = evaluate(model, "medmix", rows, protocols)
    # fixed seeds (NaN where a small subset has no defined label)
    np.testing.assert_array_equal([s.macro_auc for s in scores], [s.macro_auc for s in again])
    kinds = {(s.protocol, s.setting) for s in scores}
    assert ("sweep", "0.3") in kinds and ("drop_input", "demographics") in kinds
    assert ("not_at_random", "left_fundus") in kinds and ("natural_incomplete", "some input missing") in kinds
    sweep0 = next(s for s in scores if s.protocol == "sweep" and s.setting == "0")
    probs = model.predict_rows(rows)
    from midol.analysis.robustness import macro_auc

    assert sweep0.macro_auc == pytest.approx(macro_auc(probs, torch.as_tensor(model.table.targets[rows]),
                                                       model.table.label_names)[0])
    paths = write_report(scores, tmp_path)
    assert paths["png"].stat().st_size > 1000
    assert "| sweep | drop rate 0.3 |" in paths["md"].read_text()


def test_one_input_drop_never_trains_on_that_input(tmp_path):
    manifest = odir_subset(tmp_path, {"train": 24, "val": 8, "test": 8})
    model = medmix(tmp_path / "cache", teachers=None, train_drop_input="demographics")
    t = trainer(tmp_path, epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, datamodule=datamodule(manifest))
    # the tabular encoder's gradient was exactly zero at every step (AdamW's first moment
    # stays 0), while the image pooling trained
    state = t.optimizers[0].state
    for name, p in model.net.tabular["demographics"].named_parameters():
        if p in state:
            assert torch.count_nonzero(state[p]["exp_avg"]) == 0, name
    pool = next(model.net.pools["fundus"].parameters())
    assert torch.count_nonzero(state[pool]["exp_avg"]) > 0


def test_bad_expert_configs_fail_early(tmp_path):
    with pytest.raises(FileNotFoundError, match="README"):
        MedMIX(experts={"fundus": [{"name": "x", "checkpoint": str(tmp_path / "missing.safetensors")}]})
    with pytest.raises(ValueError, match="unknown expert key"):
        MedMIX(experts={"fundus": [{"name": "x", "backbone": "resnet18", "weights": "a"}]})
    with pytest.raises(ValueError, match="teachers for modalities"):
        MedMIX(experts={"fundus": [{"name": "x", "backbone": "resnet18"}]},
               teachers={"oct": {"name": "t", "backbone": "resnet18"}})
    with pytest.raises(ValueError, match="fusion must be"):
        MedMIX(experts={"fundus": [{"name": "x", "backbone": "resnet18"}]}, fusion="max")
    with pytest.raises(ValueError, match="kd_weight"):
        MedMIX(experts={"fundus": [{"name": "x", "backbone": "resnet18"}]}, kd_weight=1.0)


def test_robustness_and_export_commands_on_a_checkpoint(fitted, tmp_path, capsys):
    from midol.cli import main

    out = tmp_path / "report"
    # the data come back from the checkpoint's datamodule settings (relative cache dir: absolute here)
    assert main(["robustness", str(fitted["ckpt"]), "--out", str(out), "--rates", "0", "0.5",
                 "--seeds", "0"]) == 0
    text = (out / "robustness.md").read_text()
    assert "| sweep | drop rate 0.5 |" in text and (out / "robustness.png").is_file()
    rows = json.loads((out / "robustness.json").read_text())
    direct = evaluate(fitted["model"], "medmix", fitted["model"].table.rows("test"),
                      Protocols(rates=(0.0, 0.5), seeds=(0,)))
    assert rows[0]["macro_auc"] == pytest.approx(direct[0].macro_auc)
    assert main(["export", str(fitted["ckpt"]), "--out", str(tmp_path / "dep")]) == 0
    assert (tmp_path / "dep" / "medmix.safetensors").is_file()


def test_teacher_logits_enter_as_a_kl_term(tmp_path):
    manifest = odir_subset(tmp_path, {"train": 24, "val": 8, "test": 8})
    with open(manifest, newline="") as fh:
        ids = [r["patient_id"] for r in csv.DictReader(fh)]
    logits = tmp_path / "teacher_logits.csv"
    labels = ["N", "D", "G", "C", "A", "H", "M", "O"]
    with open(logits, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["patient_id", *labels])
        for i, pid in enumerate(ids):
            writer.writerow([pid, *[(i + k) % 3 - 1.0 for k in range(8)]])
    model = medmix(tmp_path / "cache", teachers=None, teacher_logits=str(logits), kd_weight=1.0)
    t = trainer(tmp_path, epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, datamodule=datamodule(manifest))
    assert float(t.callback_metrics["train/l_kd_epoch"]) > 0
    first = ids[0]
    rows = model.features.teacher_logits[model.table.patient_ids.index(first)]
    torch.testing.assert_close(rows, torch.tensor([(0 + k) % 3 - 1.0 for k in range(8)]))
    # a patient without teacher logits is a clear error
    with open(logits, "w", newline="") as fh:
        csv.writer(fh).writerow(["patient_id", *labels])
    fresh = medmix(tmp_path / "cache", teachers=None, teacher_logits=str(logits), kd_weight=1.0)
    with pytest.raises(ValueError, match="no teacher logits"):
        fresh.attach(datamodule(manifest))


def test_finetune_experts_trains_them_on_pixels_without_the_cache(tmp_path):
    manifest = odir_subset(tmp_path, {"train": 16, "val": 8, "test": 8})
    model = medmix(tmp_path / "cache", teachers=None, finetune_experts=True)
    dm = datamodule(manifest, batch_size=8)
    t = trainer(tmp_path, epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.attach(dm, fit=False)
        before = [p.detach().clone() for p in model.experts.parameters()]
        t.fit(model, datamodule=dm)
    assert dm.load_images is True and not model.features.experts
    assert not (tmp_path / "cache").exists()  # no expert feature was cached
    changed = [not torch.equal(a, b) for a, b in zip(before, model.experts.parameters(), strict=True)]
    assert any(changed) and all(p.requires_grad for p in model.experts.parameters())


def test_multiclass_labels_give_accuracy_and_auc(tmp_path):
    manifest = odir_subset(tmp_path, {"train": 24, "val": 8, "test": 8})
    with open(manifest, newline="") as fh:
        reader = csv.DictReader(fh)
        header, rows = list(reader.fieldnames or []), list(reader)
    for r in rows:  # one class per patient: normal or not
        r["grade"] = "normal" if r["N"] == "1" else "abnormal"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, [*header, "grade"])
        writer.writeheader()
        writer.writerows(rows)
    model = medmix(tmp_path / "cache", teachers=None)
    t = trainer(tmp_path, epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, datamodule=datamodule(manifest, label_columns=["grade"], task="multiclass"))
    assert model.structure["label_names"] == ["abnormal", "normal"]
    assert 0 <= float(t.callback_metrics["train/acc"]) <= 1
    assert "train/auc" in t.callback_metrics


def test_initialisation_does_not_depend_on_a_warm_cache(tmp_path):
    manifest = odir_subset(tmp_path, {"train": 12, "val": 4, "test": 4})
    states = []
    for _ in range(2):  # first attach: cold cache (computes features); second: warm
        torch.manual_seed(0)
        model = medmix(tmp_path / "cache")
        model.attach(datamodule(manifest), fit=False)
        states.append({k: v.clone() for k, v in model.net.state_dict().items()})
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_unwritable_cache_stops_fit_before_the_feature_pass(tmp_path):
    """Issue 26 item 7: a cache that cannot be written failed only after the first full
    feature pass; now attach(fit=True) refuses it first, naming the option."""
    from midol.errors import OutputFileError

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    model = medmix(blocker / "cache")
    dm = datamodule(odir_subset(tmp_path, {"train": 8, "val": 4, "test": 4}))
    with pytest.raises(OutputFileError, match=r"model.init_args.cache_dir .* cannot be written"):
        model.attach(dm, fit=True)
    assert model.net is None  # nothing was built or encoded


@pytest.mark.parametrize("old", ["midol.methods.MedMIX", "midol.methods.medmix.MedMIX"])
def test_checkpoint_written_before_the_move_to_fusion_loads(fitted, tmp_path, old):
    ckpt = torch.load(fitted["ckpt"], map_location="cpu", weights_only=False)
    ckpt["midol_class_path"] = old
    if "_class_path" in ckpt.get("hyper_parameters", {}):
        ckpt["hyper_parameters"]["_class_path"] = old
    path = tmp_path / "old.ckpt"
    torch.save(ckpt, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # a checkpoint cannot be edited: no warning
        rebuilt = load_method(path)
    assert type(rebuilt) is MedMIX and type(rebuilt).__module__ == "midol.fusion.module"
    rows = fitted["model"].table.rows("test")
    dm = datamodule(fitted["manifest"])
    dm.setup("test")
    rebuilt.attach(dm, fit=False)
    torch.testing.assert_close(rebuilt.predict_rows(rows), fitted["model"].predict_rows(rows))


def test_checkpoint_exports_without_the_expert_weight_files(tmp_path):
    """Issue 26 item 12: the experts' weights are in the checkpoint, so `midol export` of a MedMIX
    checkpoint must not need the files the experts were first read from (it stopped with exit 3
    once one was moved)."""
    import timm
    from safetensors.torch import save_file

    kwargs = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2}
    weights = tmp_path / "weights" / "expert.safetensors"
    weights.parent.mkdir()
    torch.manual_seed(3)
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=0, **kwargs).state_dict(), str(weights))
    experts = {"fundus": [{"name": "from_file", "backbone": "vit_tiny_patch16_224", "backbone_kwargs": kwargs,
                           "checkpoint": str(weights), "checkpoint_format": "timm", "image_size": 32}]}
    manifest = odir_subset(tmp_path, {"train": 20, "val": 8, "test": 8})
    L.seed_everything(0)
    model = medmix(tmp_path / "cache", experts=experts, teachers=None)
    t = trainer(tmp_path, epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, datamodule=datamodule(manifest))
    ckpt = tmp_path / "medmix.ckpt"
    t.save_checkpoint(ckpt)
    weights.rename(tmp_path / "moved.safetensors")
    rebuilt = load_method(ckpt)
    path = export_deployable(rebuilt, tmp_path / "export")
    deployed, original = load_deployable(path), model.deployable().eval()
    images = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    torch.testing.assert_close(deployed.features("fundus", images), original.features("fundus", images))


def test_missingness_balance_fits_rates_on_training_rows_and_trains(tmp_path):
    manifest = odir_subset(tmp_path, {"train": 40, "val": 8, "test": 8})
    L.seed_everything(0)
    model = medmix(tmp_path / "cache", missingness_balance=True, negative_labels=["N"])
    t = trainer(tmp_path, epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, datamodule=datamodule(manifest))
    table = model.table
    rates = model._balance_rates
    assert rates.shape == (len(table.patient_ids), 3)
    assert rates[:, 2].abs().sum() == 0  # tabular input: never dropped
    assert bool((rates[:, :2] >= 0).all() and (rates[:, :2] < 1).all()) and rates[:, :2].max() > 0
    assert torch.isfinite(t.callback_metrics["train/l_task_epoch"])
    with pytest.raises(ValueError, match=r"negative_labels: \['normal'\] are not labels"):
        medmix(tmp_path / "cache", missingness_balance=True, negative_labels=["normal"]).attach(
            datamodule(manifest), fit=True)


def test_fit_ends_with_the_best_validation_metric(tmp_path, capsys):
    """Issue 27 item 11: MedMIX never printed its best validation metric (the task modules do)."""
    manifest = odir_subset(tmp_path, {"train": 20, "val": 12, "test": 8})
    L.seed_everything(0)
    model = medmix(tmp_path / "cache")
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="best",
                                               monitor="val/auc", mode="max")
    t = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[ckpt],
                  num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, datamodule=datamodule(manifest))
    out = capsys.readouterr().out
    assert f"best val/auc = {float(ckpt.best_model_score):.4f} at epoch" in out and "best.ckpt" in out


def test_deployable_scores_a_csv_of_new_patients_alone(fitted, tmp_path):
    """Issue 26: new patients could not be scored without the training rows in the manifest,
    and raw images gave probabilities off by up to 0.021 (the pre-processing was not recorded).
    A CSV of the test patients only, without labels or split, scored from the export alone,
    gives the checkpoint's probabilities (which the feature cache computed)."""
    from midol.cli import main

    model = fitted["model"]
    export = tmp_path / "export"
    export_deployable(model, export)
    meta = json.loads((export / "medmix.json").read_text())
    assert meta["preprocessing"]["image_sizes"] == {"fundus": [32, 32]}
    assert [i["name"] for i in meta["input_specs"]["inputs"]] == model.input_names
    with open(fitted["manifest"], newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    keep = ["patient_id", "left_image", "right_image", "age", "sex"]
    new = tmp_path / "new_patients.csv"
    with open(new, "w", newline="") as fh:
        writer = csv.DictWriter(fh, keep)
        writer.writeheader()
        writer.writerows({k: r[k] for k in keep} for r in rows)
    out = tmp_path / "preds.csv"
    assert main(["predict", str(export), "--images", str(new), "--out", str(out), "--root", str(ODIR)]) == 0
    with open(out, newline="") as fh:
        written = list(csv.DictReader(fh))
    assert [r["patient_id"] for r in written] == [r["patient_id"] for r in rows]
    labels = model.structure["label_names"]
    got = np.array([[float(r[f"prob_{n}"]) for n in labels] for r in written])
    table_rows = [model.table.patient_ids.index(r["patient_id"]) for r in rows]
    expected = model.predict_rows(np.array(table_rows)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    one_eyed = [r for r in written if r["inputs_used"].count("fundus") == 1]
    assert one_eyed  # absent eyes are reported as not used


def test_a_model_without_image_inputs_reloads_and_exports(tmp_path):
    """Issue 26: a demographics-only model (experts configured for fundus, no image input used)
    built those experts, saved them in its state dict without recording them, and could not be
    reloaded by midol robustness or midol export (358 unexpected keys)."""
    from tests.helpers.medmix import ODIR_INPUTS

    manifest = odir_subset(tmp_path, {"train": 20, "val": 8, "test": 8})
    L.seed_everything(0)
    model = medmix(tmp_path / "cache", teachers=None)
    t = trainer(tmp_path, epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, datamodule=datamodule(manifest, inputs=[ODIR_INPUTS[2]]))
    assert len(model.experts) == 0 and not any(k.startswith("experts.") for k in model.state_dict())
    ckpt = tmp_path / "demographics.ckpt"
    t.save_checkpoint(ckpt)
    rebuilt = load_method(ckpt)
    deployed = load_deployable(export_deployable(rebuilt, tmp_path / "export"))
    assert sum(p.numel() for p in deployed.parameters()) == sum(p.numel() for p in model.net.parameters())
