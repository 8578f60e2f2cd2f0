"""lmm.data: files on disk -> the batches the model trains on.

Formats (MMC4 / OBELICS documents, webdataset or parquet pairs, video clips, audio-text pairs, LLaVA conversations
with images, videos and audio),
local sources (webdataset shards, HF `datasets` files), Flamingo formatting and labels, packing,
mixtures and curricula, and a sharded, resumable multi-worker loader that skips and counts bad samples;
data preparers (`prepare`) that write demo data as ordinary files, and an in-order reader (`ordered`).
It knows the model only through a tokenizer, an image transform and the other encoders' `preprocess` (audio);
it never imports lmm.model.
"""

from .config import DataConfig, DatasetConfig, StageConfig
from .easyvqa import easyvqa_records, easyvqa_samples
from .encode import SampleEncoder
from .errors import REASONS, BadSample, DataError, format_counts
from .formats import MediaRef, Sample, parse_record
from .loader import LMMLoader, build_loader
from .ordered import iter_dataset
from .packing import Encoded, collate, collate_packed
from .prepare import PREPARERS, prepare_datasets, run_preparer
from .text import encode_conversation, encode_document, flamingo_text

__all__ = [
    "DataConfig",
    "DatasetConfig",
    "StageConfig",
    "build_loader",
    "LMMLoader",
    "SampleEncoder",
    "BadSample",
    "DataError",
    "REASONS",
    "format_counts",
    "Sample",
    "MediaRef",
    "parse_record",
    "Encoded",
    "collate",
    "collate_packed",
    "encode_document",
    "encode_conversation",
    "flamingo_text",
    "easyvqa_samples",
    "easyvqa_records",
    "iter_dataset",
    "PREPARERS",
    "prepare_datasets",
    "run_preparer",
]
