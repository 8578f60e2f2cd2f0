"""The training loader: multi-worker, sharded over ranks and workers, resumable, bad-sample counting.

    loader = build_loader(cfg, tokenizer, image_transform, rank=r, world_size=n,
                          media_processors={"audio": model.encoders["audio"].preprocess})
    for batch in loader: ...                  # dicts in the batch contract (see data.packing)
    ckpt["data"] = loader.state_dict()        # after the batches consumed so far
    loader.load_state_dict(ckpt["data"])      # a new loader continues with the next unseen batch
    loader.bad_sample_counts()                # {reason: count} over this rank's workers

Each (rank, worker) is one *reader* g of G = world_size x num_workers: it owns a disjoint share of
every dataset, draws from the stage's mixture, packs/batches, and tags each batch with its state.
With `batch_size=None`, torch's DataLoader hands batches over round-robin by worker, so batch n
comes from worker n % W; a resumed loader rotates its workers so that order continues exactly.
Exact resume holds for endless streams (`epochs: null`, the default for training) and for finite
ones until the first worker runs dry.
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from collections.abc import Callable, Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import DataConfig
from .encode import SampleEncoder
from .errors import BadSample, BadSampleCounter, DataError, format_counts
from .formats import parse_record
from .mixture import Mixture, Schedule
from .packing import collate, collate_packed, fits
from .sources import build_source
from .stream import DatasetStream

STATE_VERSION = 1


class ReaderPipeline:
    """What one reader does: curriculum stage -> mixture draw -> dataset stream -> rows -> batch."""

    def __init__(
        self,
        cfg: DataConfig,
        encoder: SampleEncoder,
        sources: dict,
        reader: int,
        readers: int,
        worker: int,
        workers: int,
        state: dict | None = None,
    ):
        self.cfg, self.encoder, self.sources = cfg, encoder, sources
        self.reader, self.readers, self.worker, self.workers = reader, readers, worker, workers
        self.stages = cfg.resolved_stages()
        self.schedule = Schedule([s.steps for s in self.stages])
        self.task_names = cfg.task_names()
        blank = encoder.blank_media()
        self.media_shape, self.media_dtype = tuple(blank.shape), blank.dtype
        self.counter = BadSampleCounter(log=cfg.log_bad_samples)
        self.batches, self.draws, self.stage = 0, 0, None
        self.saved: dict = {}  # dataset name -> stream state (streams not open right now)
        self.streams: dict = {}
        self.exhausted: set = set()
        self.pending = None  # (Encoded, snapshot before it) that did not fit the last packed batch
        self.mixture = None
        if state:
            self._restore(state)
            self.batches = state["batches"]

    # ------------------------------------------------------------------ state
    def snapshot(self) -> dict:
        datasets = copy.deepcopy(self.saved)
        datasets.update({name: s.state_dict() for name, s in self.streams.items()})
        return {
            "version": STATE_VERSION,
            "batches": self.batches,
            "draws": self.draws,
            "stage": self.stage,
            "datasets": datasets,
            "exhausted": sorted(self.exhausted),
            "bad": dict(self.counter.counts),
        }

    def _restore(self, snap: dict) -> None:
        self.draws, self.saved = snap["draws"], copy.deepcopy(snap["datasets"])
        self.streams, self.exhausted = {}, set(snap["exhausted"])
        self.counter.counts = Counter(snap["bad"])
        self._set_stage(snap["stage"])

    def _set_stage(self, stage: int | None) -> None:
        self.stage = stage
        if stage is None:
            return
        ds = self.stages[stage].datasets
        self.mixture = Mixture([d.weight for d in ds], self.cfg.seed, self.reader)
        for i, d in enumerate(ds):
            if d.display_name() in self.exhausted:
                self.mixture.exhaust(i)

    def _stream(self, dcfg) -> DatasetStream:
        name = dcfg.display_name()
        if name not in self.streams:
            self.streams[name] = DatasetStream(
                dcfg,
                self.sources[name],
                self.encoder,
                self.task_names.index(name),
                self.reader,
                self.readers,
                self.counter,
                self.cfg.epochs,
                self.cfg.seed,
                self.saved.pop(name, None),
            )
        return self.streams[name]

    # ------------------------------------------------------------------ drawing
    def _draw(self):
        """(Encoded, snapshot taken before it) from the stage's mixture, or None when all are exhausted."""
        if self.pending is not None:
            item, self.pending = self.pending, None
            return item
        snap = self.snapshot()
        datasets = self.stages[self.stage].datasets
        while True:
            i = self.mixture.choose(self.draws)
            self.draws += 1
            if i is None:
                return None
            enc = self._stream(datasets[i]).next()
            if enc is not None:
                return enc, snap
            self.mixture.exhaust(i)
            self.exhausted.add(datasets[i].display_name())

    def _rows(self) -> tuple[list, dict | None]:
        """The next batch's rows and the state to resume after it (before a sample left pending)."""
        B = self.cfg.batch_size
        if not self.cfg.packing:
            rows = []
            while len(rows) < B and (item := self._draw()) is not None:
                rows.append(item[0])
            return rows, None
        rows, cur = [], []
        while True:
            item = self._draw()
            if item is None:
                return rows + ([cur] if cur else []), None
            if cur and not fits(cur, item[0], self.cfg.max_tokens, self.cfg.pack_max_images):
                rows.append(cur)
                cur = []
                if len(rows) == B:
                    self.pending = item
                    return rows, item[1]
            cur.append(item[0])

    def batches_iter(self) -> Iterator[tuple[dict | None, dict]]:
        """(batch, state after it) until the curriculum or the data ends; then (None, final state),
        so that bad samples read after the last batch are still reported."""
        yield from self._batches()
        yield None, self.snapshot()

    def _batches(self) -> Iterator[tuple[dict, dict]]:
        while True:
            stage = self.schedule.stage_at(self.batches * self.workers + self.worker)
            if stage is None:
                return
            if stage != self.stage:
                if self.pending is not None:  # a leftover of the previous stage: rewind to before it
                    self._restore(self.pending[1])
                    self.pending = None
                self._set_stage(stage)
            rows, resume = self._rows()
            if not rows or (self.cfg.drop_last and len(rows) < self.cfg.batch_size):
                return
            pad = self.encoder.tokenizer.pad_token_id
            if self.cfg.packing:
                batch = collate_packed(rows, pad, self.cfg.max_tokens, self.media_shape, self.media_dtype)
            else:
                batch = collate(rows, pad, self.media_shape, self.media_dtype)
            self.batches += 1
            state = copy.deepcopy(resume) if resume is not None else self.snapshot()
            state["batches"] = self.batches
            yield batch, state


class _ReaderDataset(IterableDataset):
    """The IterableDataset each DataLoader worker runs: one ReaderPipeline for its logical worker id."""

    def __init__(self, cfg, encoder, sources, rank, world_size, workers, states, offset):
        self.cfg, self.encoder, self.sources = cfg, encoder, sources
        self.rank, self.world_size, self.workers, self.states, self.offset = rank, world_size, workers, states, offset

    def __iter__(self):
        info = get_worker_info()
        logical = ((info.id if info else 0) + self.offset) % self.workers
        pipe = ReaderPipeline(
            self.cfg,
            self.encoder,
            self.sources,
            self.rank * self.workers + logical,
            self.world_size * self.workers,
            logical,
            self.workers,
            self.states.get(logical),
        )
        for batch, state in pipe.batches_iter():
            yield batch, logical, state


class LMMLoader:
    """Iterable of batch dicts with `state_dict()` / `load_state_dict()` and bad-sample counts.

    Every `iter(loader)` continues from the batches handed out so far (or from a loaded state).
    """

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer,
        image_transform: Callable,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
        probe: bool = True,
        system_prompt: str | None = None,
        media_processors: dict[str, Callable] | None = None,
        sampling_rate: int | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.cfg, self.rank, self.world_size, self.pin_memory = cfg, rank, world_size, pin_memory
        self.stages = cfg.resolved_stages()
        self.task_names = cfg.task_names()
        self.loss_weights = cfg.loss_weights()
        self.encoder = SampleEncoder(
            tokenizer,
            image_transform,
            cfg.max_tokens,
            cfg.max_images,
            cfg.too_many_images,
            cfg.num_frames,
            system_prompt=system_prompt,
            media_processors=media_processors,
            **({"sampling_rate": sampling_rate} if sampling_rate else {}),
        )
        self.sources = {}
        for stage in self.stages:
            for d in stage.datasets:
                if d.display_name() not in self.sources:
                    self.sources[d.display_name()] = build_source(d, cfg.seed)
                    if probe:
                        probe_dataset(d, self.sources[d.display_name()], self.encoder)
        self.workers = max(1, cfg.num_workers)
        self._consumed = 0
        self._states: dict = {}

    def __iter__(self) -> Iterator[dict]:
        dataset = _ReaderDataset(
            self.cfg,
            self.encoder,
            self.sources,
            self.rank,
            self.world_size,
            self.workers,
            copy.deepcopy(self._states),
            self._consumed % self.workers,
        )
        extra = dict(prefetch_factor=self.cfg.prefetch_factor) if self.cfg.num_workers > 0 else {}
        dl = DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers, pin_memory=self.pin_memory, **extra)
        for batch, logical, state in dl:
            self._states[int(logical)] = state
            if batch is None:  # a worker's end-of-data marker: only its final counts
                continue
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict:
        """Everything needed to continue after the batches handed out so far (small; JSON-able)."""
        return {
            "version": STATE_VERSION,
            "consumed": self._consumed,
            "workers": self.workers,
            "rank": self.rank,
            "world_size": self.world_size,
            "readers": copy.deepcopy(self._states),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')} is not {STATE_VERSION}")
        if state["workers"] != self.workers or state["world_size"] != self.world_size:
            raise ValueError(
                f"data state was saved with world_size={state['world_size']} x "
                f"num_workers={state['workers']}; resume with the same (now {self.world_size} x "
                f"{self.workers}) or the sample order cannot continue exactly"
            )
        self._consumed = state["consumed"]
        self._states = {int(k): copy.deepcopy(v) for k, v in state["readers"].items()}

    def bad_sample_counts(self) -> dict:
        """Skipped samples per reason, summed over this rank's workers (as of the last batch handed out)."""
        total: Counter = Counter()
        for s in self._states.values():
            total.update(s.get("bad", {}))
        return dict(total)

    def report(self) -> str:
        """A human-readable bad-sample report for the end of a run."""
        return format_counts(self.bad_sample_counts())

    @property
    def step(self) -> int:
        """Batches handed out so far (per rank), i.e. the curriculum step of the next batch."""
        return self._consumed


def probe_dataset(dcfg, source, encoder: SampleEncoder, records: int = 32) -> None:
    """Fail at start-up with a clear message when a dataset yields no usable sample in its first records."""
    source.check()
    counter = BadSampleCounter(log=False)
    seen = 0
    on_error = lambda exn, path: counter.add(BadSample("truncated_shard", str(exn)), key=path)  # noqa: E731
    for key, record, _ in source.iter_records(0, 0, 1, None, on_error):
        if record is None:
            continue
        seen += 1
        try:
            sample = parse_record(record, dcfg.format, key, dcfg.image_key, dcfg.text_key, dcfg.min_similarity)
            sample, frames = encoder.decode(sample, dcfg.image_root, dcfg.num_frames)
            encoder.encode(sample, frames)
            return
        except BadSample as e:
            counter.add(e, key=key)
        if seen >= records:
            break
    raise DataError(
        f"dataset {dcfg.display_name()!r} ({dcfg.path}): none of its first {seen} records is usable "
        f"({dict(counter.counts) or 'no records'}); check `format`, `image_key`/`text_key`, "
        f"`image_root` and max_tokens"
    )


def build_loader(
    cfg: DataConfig,
    tokenizer,
    image_transform: Callable,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    system_prompt: str | None = None,
    media_processors: dict[str, Callable] | None = None,
    sampling_rate: int | None = None,
) -> LMMLoader:
    """The resumable training loader for `cfg` (see the module docstring). `system_prompt`: the model's default
    system message (`model.config.system_prompt`), given to conversations that bring none, as `model.chat` does.
    `media_processors`: {modality: raw item -> (F, ...) tensor} for the model's other encoders (`audio`: its
    `preprocess`), as `image_transform` is the vision tower's; `sampling_rate`: what audio is decoded to."""
    if cfg.num_workers > 0:  # forked workers and a tokenizer's own threads deadlock: let the workers parallelise
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return LMMLoader(
        cfg,
        tokenizer,
        image_transform,
        rank,
        world_size,
        pin_memory,
        system_prompt=system_prompt,
        media_processors=media_processors,
        sampling_rate=sampling_rate,
    )
