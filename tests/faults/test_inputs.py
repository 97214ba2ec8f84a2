"""Bad and unusual inputs through the whole pre-training path: a clear error naming the file or
setting, or the documented handling (midol/data/image_io.py), never a silent wrong result.
Per-format decoding is tested in test_data_image_io.py; here the files go through the
datamodule, the transforms, a Trainer or `midol fit`."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from midol.cli import main
from midol.data import DataSource, EvalTransform, MultiCropTransform, PretrainDataModule
from midol.data.image_io import UnreadableImageError, UnreadableImageWarning, load_image
from midol.data.sampler import Draw
from tests.helpers.faults import tiny_config
from tests.helpers.tiny import tiny_datamodule, tiny_module

XRAY = "xray/NORMAL/IM-0001-0001.png"  # 128 x 128 8-bit grey
TISSUE = "pathology/MUS"  # 224 x 224 RGB JPEG tiles


def _views(folder: Path, index: int, key: tuple[int, int] = (0, 5)) -> list[torch.Tensor]:
    dm = PretrainDataModule([DataSource(str(folder), "x")], num_workers=0, seed=3,
                            transform=MultiCropTransform(global_size=64, local_size=32,
                                                         num_local=2))
    dm.setup("fit")
    assert dm.dataset is not None
    return dm.dataset[Draw(index, *key)]["views"]


def _corrupt_variants(sample_data: Path, folder: Path) -> list[Path]:
    png = (sample_data / XRAY).read_bytes()
    jpg = sorted((sample_data / TISSUE).glob("*.jpg"))[0].read_bytes()
    mid = len(png) // 2
    flipped = png[:mid] + bytes(b ^ 0xFF for b in png[mid:mid + 64]) + png[mid + 64:]
    files = {
        "a_truncated.png": png[:mid],
        "b_corrupt.png": flipped,
        "c_truncated.jpg": jpg[: len(jpg) // 2],
        "d_empty.png": b"",
        "e_not_an_image.png": b"<html>404 Not Found</html>",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in files]


def test_corrupt_and_truncated_files_raise_naming_the_file(sample_data: Path, tmp_path: Path):
    for path in _corrupt_variants(sample_data, tmp_path):
        with pytest.raises(UnreadableImageError) as err:
            load_image(path)
        assert err.value.path == str(path) and err.value.reason


def test_corrupt_files_are_skipped_and_counted_during_fit(sample_data: Path, tmp_path: Path):
    """Five broken files among eight real X-rays: the run trains on full batches, warns once per
    file (from midol, not from a data worker) and once per epoch with the count of distinct
    files, and logs train/skipped_images (issue 27 item 12: before, a warning per draw, every
    epoch, 15 "images" for 5 files)."""
    bad = _corrupt_variants(sample_data, tmp_path)
    for src in sorted((sample_data / "xray" / "NORMAL").glob("*.png"))[:8]:
        shutil.copy(src, tmp_path / f"z_{src.name}")
    dm = tiny_datamodule(sources=[DataSource(str(tmp_path), "xray")], batch_size=13,
                         samples_per_epoch=13)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.warns(UserWarning) as caught:
        trainer.fit(tiny_module(), datamodule=dm)
    messages = [str(w.message) for w in caught]
    per_file = [str(w.message) for w in caught if w.category is UnreadableImageWarning]
    assert {p.name for p in bad} == {Path(m.split(": ")[0].split()[-1]).name for m in per_file}
    # The epoch is a permutation of the 13 files and a broken file is replaced by the next one:
    # drawing broken file k (sorted first, k = 0..4) skips files k..4: 15 skips of 5 files.
    assert len(per_file) == 5  # each file named once
    assert all(w.filename.endswith("base.py") or "midol" in w.filename for w in caught
               if w.category is UnreadableImageWarning)
    assert any("epoch 0: 5 unreadable image(s) were skipped" in m for m in messages)
    assert trainer.callback_metrics["train/skipped_images"] == 5


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16bit_grey_is_scaled_to_the_model_range_not_clipped(
    sample_data: Path, tmp_path: Path, fmt: str
) -> None:
    """A 16-bit X-ray (v * 257, as 8 -> 16-bit converters write) gives the very views of its
    8-bit source; clipping to 8 bits would turn it white."""
    grey = np.asarray(Image.open(sample_data / XRAY).convert("L"))
    Image.fromarray(grey).save(tmp_path / f"a.{fmt}")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / f"b.{fmt}")
    assert Image.open(tmp_path / f"b.{fmt}").mode.startswith("I;16")
    eight, sixteen = _views(tmp_path, 0), _views(tmp_path, 1)
    assert all(torch.equal(a, b) for a, b in zip(eight, sixteen, strict=True))
    assert 0 < float(sixteen[0].float().mean()) < 250  # not saturated


def test_rgba_and_cmyk_files_give_the_rgb_views(sample_data: Path, tmp_path: Path) -> None:
    rgb = Image.open(sorted((sample_data / TISSUE).glob("*.jpg"))[0]).convert("RGB")
    rgb.save(tmp_path / "a_rgb.png")
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.full(rgb.size[::-1], 200, np.uint8)))
    rgba.save(tmp_path / "b_rgba.png")  # alpha is dropped, colours kept as stored
    rgb.convert("CMYK").save(tmp_path / "c_cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "c_cmyk.jpg").mode == "CMYK"
    base, alpha, cmyk = _views(tmp_path, 0), _views(tmp_path, 1), _views(tmp_path, 2)
    assert all(torch.equal(a, b) for a, b in zip(base, alpha, strict=True))
    for a, c in zip(base, cmyk, strict=True):
        assert c.shape == a.shape and (a.float() - c.float()).abs().mean() < 6  # JPEG error only


def test_images_smaller_than_the_crop_are_upsampled(sample_data: Path) -> None:
    """A 20 x 20 real image still yields full-size views with its content (bicubic upsampling
    in RandomResizedCrop / the eval resize), not a padded or constant image."""
    small = load_image(sample_data / XRAY)[40:60, 50:70]
    transform = MultiCropTransform(global_size=224, local_size=96, seed=0)
    transform.reseed((0, 1))
    views = transform(small)
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 6
    assert all(float(v.float().std()) > 1 for v in views)
    centre = EvalTransform(224)(small)
    assert centre.shape == (3, 224, 224)
    assert abs(float(centre.float().mean()) - float(small.mean())) < 3  # same content, upscaled


def _fit_with_sources(tmp_path: Path, sources: list[dict]) -> None:
    config = tiny_config(tmp_path / "run", num_workers=0, deterministic=False)
    data = yaml.safe_load(config.read_text())
    data["data"]["init_args"]["sources"] = sources
    config.write_text(yaml.safe_dump(data))
    main(["fit", "--config", str(config)])


def test_missing_path_and_empty_folder_stop_fit_naming_the_source(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match=r"no_such_folder.*path does not exist"):
        _fit_with_sources(tmp_path, [{"path": str(missing), "modality": "xray"}])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"empty.*no image file found"):
        _fit_with_sources(tmp_path, [{"path": str(empty), "modality": "xray"}])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_unreadable_file_is_named_once_per_run_and_counted_per_epoch() -> None:
    import warnings

    module = tiny_module()
    logged: list[float] = []
    module.log = lambda name, value, **kw: logged.append(value)  # type: ignore[method-assign]
    batch = {"skipped": ["a.png: truncated", "b.png: not an image", "a.png: truncated"]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _epoch in range(2):
            module.on_train_batch_end(None, batch, 0)
            module.on_train_batch_end(None, batch, 1)
            module.on_train_epoch_end()
    per_file = [str(w.message) for w in caught if w.category is UnreadableImageWarning]
    assert per_file == ["skipping unreadable image a.png: truncated",
                        "skipping unreadable image b.png: not an image"]
    assert logged == [2.0, 2.0]  # distinct files per epoch
