"""Include/exclude globs per source (a dataset's masks are not images to pre-train on) and the
start-up table of images and draw shares per source and modality."""

from __future__ import annotations

import logging

import pytest

from midol.data import DataSource, PretrainDataModule, SingleViewTransform
from midol.data.sources import resolve_source, source_table
from tests.helpers.paths import SAMPLE_DATA, SHARED_DATA

PH2 = SHARED_DATA / "dermoscopy" / "ph2_lesion"


@pytest.mark.skipif(not PH2.is_dir(), reason="PH2 not found")
def test_exclude_keeps_segmentation_masks_out_of_the_corpus():
    images = len(list((PH2 / "images").iterdir()))
    masks = len(list((PH2 / "masks").iterdir()))
    assert len(resolve_source(DataSource(str(PH2), "dermoscopy"))) == images + masks  # the trap
    kept = resolve_source(DataSource(str(PH2), "dermoscopy", exclude=["masks/*"]))
    assert len(kept) == images and all("/masks/" not in p for p in kept.paths)
    only = resolve_source(DataSource(str(PH2), "dermoscopy", include=["images/*"]))
    assert only.paths == kept.paths
    with pytest.raises(ValueError, match=r"include \['nothing/\*'\] / exclude \[\] leave none of its"):
        resolve_source(DataSource(str(PH2), "dermoscopy", include=["nothing/*"]))


def test_start_up_table_counts_images_and_draw_shares(caplog):
    sources = [DataSource(str(SAMPLE_DATA / "xray"), "xray", weight=2.0),
               DataSource(str(SAMPLE_DATA / "oct"), "oct")]
    xray, oct_ = (len(resolve_source(s)) for s in sources)
    table = source_table(sources, [xray, oct_])
    share = 2 * xray / (2 * xray + oct_)
    assert f"| {SAMPLE_DATA / 'xray'} | xray | folder | {xray} | 2 | {share:.1%} |" in table
    assert f"| | oct | | {oct_} | | {1 - share:.1%} |" in table
    dm = PretrainDataModule(sources=sources, transform=SingleViewTransform(size=32), batch_size=4,
                            num_workers=0)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        dm.setup("fit")
    assert any(table in r.getMessage() for r in caplog.records)
