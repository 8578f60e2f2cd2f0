"""One dataset as seen by one reader (a rank's worker): a resumable stream of Encoded samples.

records (source, sharded) -> Sample (formats) -> decoded media (encode.decode) -> [repeat buffer]
-> Encoded (encode.encode). Bad samples are counted and skipped here; epochs roll over here.
State: {"epoch", "cursor" (the source's position after the last record read), "good", "done"}.
"""

from __future__ import annotations

import copy

from .errors import BadSample, BadSampleCounter, DataError
from .formats import parse_record
from .mixture import RepeatBuffer
from .packing import Encoded

MAX_CONSECUTIVE_FAILURES = 1000  # decoded samples in a row that fail to encode: a config problem, not bad data


class DatasetStream:
    def __init__(
        self,
        dcfg,
        source,
        encoder,
        task: int,
        reader: int,
        readers: int,
        counter: BadSampleCounter,
        epochs: int | None = None,
        seed: int = 0,
        state: dict | None = None,
    ):
        self.cfg, self.source, self.encoder, self.task = dcfg, source, encoder, task
        self.reader, self.readers, self.counter, self.epochs, self.seed = reader, readers, counter, epochs, seed
        self.state = copy.deepcopy(state) if state else {"epoch": 0, "cursor": None, "good": 0, "done": False}
        self._records = None
        self._seq = 0
        self._broken: set = set()
        self.buffer = None
        if dcfg.repeat_buffer > 0 and dcfg.repeat > 1:
            self.buffer = RepeatBuffer(self._fetch, dcfg.repeat_buffer, dcfg.repeat, seed, reader)

    # ------------------------------------------------------------------ reading
    def _on_read_error(self, exn, path):
        if (self.state["epoch"], path) in self._broken:  # one count per damaged shard and epoch
            return
        self._broken.add((self.state["epoch"], path))
        self.counter.add(
            BadSample("truncated_shard", f"{type(exn).__name__}: {exn}"), key=path, source=self.source.name
        )

    def _next_record(self):
        """(key, record) of the next record this reader owns, rolling epochs over; None when done."""
        while not self.state["done"]:
            if self._records is None:
                self._records = self.source.iter_records(
                    self.state["epoch"], self.reader, self.readers, self.state["cursor"], self._on_read_error
                )
                self._read_this_epoch = self.state["cursor"] is not None
            for key, record, cursor in self._records:
                self.state["cursor"] = cursor
                if record is not None:
                    self._read_this_epoch = True
                    return key, record
            self._records = None
            if not self._read_this_epoch:  # this reader owns no records at all
                self.state["done"] = True
                break
            if self.state["good"] == 0:
                raise DataError(
                    f"dataset {self.source.name!r}: every record read in epoch {self.state['epoch']} "
                    f"was bad ({dict(self.counter.counts)}); check its path, format and keys"
                )
            self.state.update(epoch=self.state["epoch"] + 1, cursor=None, good=0)
            if self.epochs is not None and self.state["epoch"] >= self.epochs:
                self.state["done"] = True
        return None

    def _fetch(self):
        """The next good decoded sample: (sample, frames, state before it), or None when done."""
        while True:
            before = copy.deepcopy(self.state)
            got = self._next_record()
            if got is None:
                return None
            key, record = got
            try:
                sample = parse_record(
                    record, self.cfg.format, key, self.cfg.image_key, self.cfg.text_key, self.cfg.min_similarity
                )
                sample, frames = self.encoder.decode(sample, self.cfg.image_root, self.cfg.num_frames)
            except BadSample as e:
                self.counter.add(e, key=key, source=self.source.name)
                continue
            self.state["good"] += 1
            self._seq += 1
            return sample, frames, before, self._seq

    def next(self) -> Encoded | None:
        """The next Encoded sample, or None when this reader's share is exhausted."""
        failures = 0
        while True:
            item = self.buffer.next() if self.buffer is not None else self._fetch()
            if item is None:
                return None
            sample, frames, _before, _seq = item
            try:
                return self.encoder.encode(sample, frames, self.task)
            except BadSample as e:
                self.counter.add(e, key=sample.key, source=self.source.name)
                failures += 1
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    raise DataError(
                        f"dataset {self.source.name!r}: {failures} samples in a row could not be "
                        f"encoded ({dict(self.counter.counts)}); check data.max_tokens / max_images"
                    ) from e

    def state_dict(self) -> dict:
        """Where to resume. With a repeat buffer: before the oldest buffered sample (it gets re-read)."""
        if self.buffer is not None and self.buffer.items:
            return copy.deepcopy(min(self.buffer.items, key=lambda e: e[0][3])[0][2])
        return copy.deepcopy(self.state)
