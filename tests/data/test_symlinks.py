"""Symbolic links in an image folder (midol.data.readers.scan_images): a link back up the tree
or a loop is walked once and counted in one warning, a file reached twice is listed once
(by real path), and a link to the parent folder does not hang the scan."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from midol.data import DataSource
from midol.data.readers import scan_images
from midol.data.sources import resolve_source

pytestmark = pytest.mark.skipif(os.name == "nt", reason="symbolic links need POSIX")


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(path)
    return path


def _scan_within(root: Path, seconds: float = 20.0, **kwargs) -> list[str]:
    """``scan_images`` in a thread with a time limit (a hang fails the test, not the run)."""
    result: dict[str, object] = {}

    def scan() -> None:
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result["paths"] = scan_images(str(root), **kwargs)
            except BaseException as err:  # noqa: BLE001 - re-raised in the test thread
                result["error"] = err
            result["warnings"] = [str(w.message) for w in caught]

    thread = threading.Thread(target=scan, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"scan_images({root}) did not finish in {seconds} s"
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    _scan_within.warnings = result["warnings"]  # type: ignore[attr-defined]
    return result["paths"]  # type: ignore[return-value]


def test_link_back_to_the_folder_lists_each_image_once_and_warns(tmp_path):
    root = tmp_path / "data"
    a = _png(root / "a.png")
    b = _png(root / "sub" / "b.png")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)  # sub/loop -> data
    paths = _scan_within(root)
    assert paths == [str(a), str(b)]
    assert _scan_within.warnings == [(  # type: ignore[attr-defined]
        f"{root}: symbolic links lead back into the tree (1 folder(s) reached again, not walked "
        "twice; 0 file(s) reached again, listed once)")]


def test_link_to_the_parent_does_not_hang(tmp_path):
    parent = tmp_path / "corpus"
    root = parent / "xray"
    img = _png(root / "x.png")
    sibling = _png(parent / "oct" / "o.png")
    (root / "up").symlink_to(parent, target_is_directory=True)  # xray/up -> corpus (holds xray)
    (root / "self").symlink_to(root / "self")  # a link to itself: not a folder, not an image
    paths = _scan_within(root)
    # the link is followed once: corpus/oct is reached through it, xray itself is not re-walked
    assert paths == [str(img), str(root / "up" / "oct" / sibling.name)]
    assert "1 folder(s) reached again" in _scan_within.warnings[0]  # type: ignore[attr-defined]


def test_duplicates_are_counted_by_real_path(tmp_path):
    root = tmp_path / "data"
    a = _png(root / "a.png")
    _png(root / "other" / "c.png")
    (root / "b_alias.png").symlink_to(a)  # the same file under another name
    (root / "z_other").symlink_to(root / "other", target_is_directory=True)  # the same folder
    paths = _scan_within(root)
    assert paths == [str(a), str(root / "other" / "c.png")]
    assert _scan_within.warnings == [(  # type: ignore[attr-defined]
        f"{root}: symbolic links lead back into the tree (1 folder(s) reached again, not walked "
        "twice; 1 file(s) reached again, listed once)")]


def test_pretraining_folder_source_goes_through_the_same_scan(tmp_path):
    root = tmp_path / "data"
    a = _png(root / "a.png")
    b = _png(root / "sub" / "b.png")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    source = DataSource(str(root), "xray", kind="folder")
    with pytest.warns(UserWarning, match=r"data source '.*data' \(modality 'xray'\): symbolic links "
                      r"lead back into the tree \(1 folder\(s\) reached again"):
        images = resolve_source(source)
    assert images.paths == [str(a), str(b)]
    assert len(images) == 2


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
@pytest.mark.filterwarnings("ignore:.*are not regular files")
def test_a_fifo_named_like_an_image_is_not_listed_nor_opened(tmp_path):
    """A FIFO ``x.png`` (or a link to one) used to be listed, and opening it blocked `midol fit`
    and `midol route` forever; only regular files are listed, the others counted in a warning."""
    root = tmp_path / "data"
    a = _png(root / "a.png")
    os.mkfifo(root / "b_fifo.png")
    (root / "c_link.png").symlink_to(root / "b_fifo.png")
    (root / "d_broken.png").symlink_to(root / "missing.png")
    e = _png(root / "sub" / "e.png")
    paths = _scan_within(root)
    assert paths == [str(a), str(e)]
    assert _scan_within.warnings == [(  # type: ignore[attr-defined]
        f"{root}: 3 file(s) with an image name are not regular files (a FIFO, a device or a "
        f"broken link) and are skipped, e.g. {root / 'b_fifo.png'}")]

    result: dict[str, object] = {}

    def load_all() -> None:  # what a pre-training or route loader does with the source
        images = resolve_source(DataSource(str(root), "xray", kind="folder"))
        result["shapes"] = [images.load(i).shape for i in range(len(images))]

    thread = threading.Thread(target=load_all, daemon=True)
    thread.start()
    thread.join(20.0)
    assert not thread.is_alive(), "reading the folder source blocked on the FIFO"
    assert result["shapes"] == [(8, 8, 3), (8, 8, 3)]
