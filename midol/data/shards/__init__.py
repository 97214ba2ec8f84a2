"""Streaming pre-training corpus for large collections: WebDataset tar shards per modality.

Write once (``midol shard``, or :func:`write_shards`)::

    midol shard --source /data/fundus fundus --source /data/cxr.csv xray --out shards/

then train from ``shards/index.json`` with :class:`ShardedPretrainDataModule`. Layout::

    shards/index.json                         # format, modalities, shard files, sample counts
    shards/<modality>/<modality>-000000.tar   # WebDataset tars: <key>.<ext> + <key>.json
    shards/<modality>/<modality>-000000.tar.offsets.npy  # byte offset of every sample (int64)

A sample's image is the source file's own bytes when its format is readable (no re-encoding),
else (arrays, ``max_side`` resizing) a PNG; its ``.json`` holds ``{"modality", "origin"}``.
Shard URLs are read with ``webdataset.gopen``: local paths, and also ``pipe:`` commands
(``pipe:aws s3 cp s3://bucket/x.tar -``) or HTTP(S) URLs written into the index by hand.

Reading is sequential (tar streams), so a collection far larger than memory or local disk
trains at the speed of the decoders. A modality with fewer shards than data-loading workers
(GPUs x workers) is split by sample instead: each worker seeks to its own samples through the
offsets file and reads only their bytes. Each modality is its own endless stream; every sample
draws its modality with the configured weights (share of the draws), then takes the next image
of that modality's stream (shard order reshuffled every pass, plus a shuffle buffer).
"""

from midol.data.shards.datamodule import ShardedPretrainDataModule
from midol.data.shards.index import INDEX_FORMAT, INDEX_NAME, ShardIndex
from midol.data.shards.stream import ShardLoader, ShardStream
from midol.data.shards.writer import write_shards

__all__ = [
    "INDEX_FORMAT",
    "INDEX_NAME",
    "ShardIndex",
    "ShardLoader",
    "ShardStream",
    "ShardedPretrainDataModule",
    "write_shards",
]
