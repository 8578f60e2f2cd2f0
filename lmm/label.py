"""`lmm data label`: pseudo-label a shard set or a folder of images (videos, audio clips: `media`) with a model,
filter, write webdataset shards.

4M built its aligned training set by letting trusted models label every image; MMC4 dropped image-text pairs
of low CLIP similarity. This is that loop for lmm models:

    inputs (webdataset tars, or a folder of images + sidecar files cut into shards of `shard_size`)
      -> rank r of W takes input shards r, r+W, ... (sorted: the same split on every launch)
      -> per shard: decode each sample's media (pluggable: MEDIA_READERS), build one prompt row per question,
         greedy-generate in left-padded batches, score each answer (mean token log-prob, teacher-forced; and
         optionally the contrastive image-text similarity), filter (min_score, min_similarity, duplicates)
      -> OUT/NAME.tar: every kept sample's original members byte for byte + `FIELD.txt` (the text) and
         `FIELD.json` (model id, prompt, scores, a conversation); written to a temp file then renamed, so a
         finished shard is complete and a relaunch skips it; an unfinished one is redone from its start.
      -> OUT/_stats/NAME.json per shard; OUT/summary.json (kept / dropped by reason) once every shard is done.

Ranks need no process group: each owns disjoint shards and the last one to finish writes the summary, so a
slow rank can never time out a collective. Launch with torchrun (RANK / WORLD_SIZE) or any launcher that sets them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import queue
import re
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

from lmm.config import ConfigError
from lmm.data.audio import AUDIO_EXTENSIONS
from lmm.data.errors import BadSample, DataError
from lmm.data.formats import IMAGE_KEYS, TOO_LARGE_KEY
from lmm.data.media import decode_image, max_member_bytes
from lmm.data.sources import expand_paths, read_tar
from lmm.data.video import VIDEO_EXTENSIONS
from lmm.inputs import VIDEO_MARKER, Audio, Video, check_audio_length
from lmm.tokens import IMAGE_TOKEN

logger = logging.getLogger("lmm.label")

PLAN_FILE = "label.json"  # the run's settings and shard list: a relaunch must match it
STATS_DIR = "_stats"
SUMMARY_FILE = "summary.json"
TASK_PROMPTS = {
    "caption": "<image>A short caption:",
    "vqa": "<image>Question: {question} Short answer:",
}
CHAT_TASK_TEXT = {"caption": "Describe the image in one sentence.", "vqa": "{question}"}
# files that start a sample in a plain folder: images, videos, audio clips
FOLDER_MEDIA_EXTS = tuple(f".{e}" for e in IMAGE_KEYS + VIDEO_EXTENSIONS + AUDIO_EXTENSIONS)
DROP_REASONS = {
    "empty_output": "the model generated no text",
    "low_score": "mean token log-prob below --min-score",
    "low_similarity": "image-text similarity below --min-similarity",
    "duplicate": "the same output as an earlier sample of the shard (--dedup)",
}
_FIELD_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class LabelConfig:
    """One labelling run (the CLI's options). Exactly one of `prompt` / `task` says what to ask."""

    model: str  # a save_pretrained directory or a preset name
    input: str  # tar file / glob / brace pattern / folder of tars / folder of images
    output: str
    prompt: str | None = None  # with one <image> marker (prepended when missing); vqa: a {question} template
    task: str | None = None  # caption | vqa
    questions: str | None = None  # vqa: a file with one question per line (or a JSON list)
    chat: bool = False  # render each question through the model's chat template
    system: str | None = None  # chat: the system message (default: the model's own)
    field: str = "label"  # members FIELD.txt and FIELD.json are added to each sample
    model_id: str | None = None  # recorded in every sample (default: the model's name)
    media: str = "image"  # image | video | audio: which MEDIA_READERS entry turns a sample into model inputs
    image_key: str | None = None  # the member holding the media (default: jpg/png/... | mp4/webm/... | wav/flac/...)
    batch_size: int = 32  # prompt rows per left-padded batch
    max_new_tokens: int = 32
    min_score: float | None = None
    min_similarity: float | None = None
    similarity: bool = False  # also score image-text similarity with the model's contrastive head
    clip_model: str | None = None  # ... or with this open_clip architecture (a name or a model-config .json)
    clip_checkpoint: str | None = None  # the open_clip weights file for clip_model
    dedup: bool = False
    shard_size: int = 1000  # samples per output shard when the input is a folder of images
    progress: bool = True
    device: str | None = None

    # settings that may change between a run and its relaunch: the texts written stay the same (left-padded
    # batches decode as each prompt alone); only the scores' last digits can move with the batch size
    VOLATILE = ("progress", "device", "batch_size")

    def validate(self) -> None:
        if self.prompt is None and self.task is None:
            raise ConfigError("say what to ask: --prompt TEXT, --task caption or --task vqa --questions FILE")
        if self.prompt is not None and self.task == "caption":
            raise ConfigError("--task caption is a built-in prompt: give --prompt TEXT or --task caption, not both")
        if self.task == "vqa" and self.prompt is not None and "{question}" not in self.prompt:
            raise ConfigError("with --task vqa, --prompt is a template: put {question} where each question goes")
        if self.task is not None and self.task not in TASK_PROMPTS:
            raise ConfigError(f"--task must be one of {', '.join(TASK_PROMPTS)}, got {self.task!r}")
        if (self.task == "vqa") != (self.questions is not None):
            raise ConfigError("--task vqa needs --questions FILE (and --questions is only for --task vqa)")
        if self.system is not None and not self.chat:
            raise ConfigError("--system is a chat-template system message: add --chat")
        if not _FIELD_NAME.match(self.field):
            raise ConfigError(f"--field must be letters, digits, '_' or '-', got {self.field!r}")
        if self.media not in MEDIA_READERS:
            raise ConfigError(f"--media must be one of {', '.join(MEDIA_READERS)}, got {self.media!r}")
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.shard_size < 1:
            raise ConfigError("batch_size, max_new_tokens and shard_size must be at least 1")
        if (self.clip_model is None) != (self.clip_checkpoint is None):
            raise ConfigError("--clip-model and --clip-checkpoint go together (an open_clip name and its weights)")
        if self.similarity and self.clip_model:
            raise ConfigError("give --similarity (the model's contrastive head) or --clip-model, not both")
        if (self.similarity or self.clip_model) and self.media != "image":
            raise ConfigError("--similarity / --clip-model score images against texts: use them with --media image")
        if self.min_similarity is not None and not (self.similarity or self.clip_model):
            raise ConfigError(
                "--min-similarity needs --similarity (contrastive head) or --clip-model/--clip-checkpoint"
            )
        if os.path.abspath(self.output) == os.path.abspath(self.input):
            raise ConfigError("--output must be a new folder, not the input")

    def fingerprint(self) -> dict:
        """What the written shards depend on: a relaunch into the same folder must agree on all of it."""
        d = {k: v for k, v in asdict(self).items() if k not in self.VOLATILE}
        for k in ("input", "output", "model"):  # the same folder however it is spelled
            if os.path.exists(os.path.expanduser(d[k])):
                d[k] = os.path.realpath(os.path.expanduser(d[k]))
        d["questions"] = load_questions(self.questions) if self.questions else None
        return d


# --------------------------------------------------------------------------- inputs


@dataclass
class InputShard:
    """One unit of work: a tar file, or a chunk of a folder's samples; `name` is its output file."""

    name: str
    path: str
    groups: list[tuple[str, list[str]]] | None = None  # folder chunk: (key, [file paths]) per sample


def plan_shards(pattern: str, shard_size: int) -> list[InputShard]:
    """The sorted work list: tars as they are, or a folder of images cut into chunks of `shard_size` samples."""
    path = os.path.expanduser(pattern)
    if os.path.isdir(path) and not any(n.endswith(".tar") for n in os.listdir(path)):
        groups = folder_samples(path)
        if not groups:
            raise DataError(f"{pattern}: no .tar files and no images ({', '.join(FOLDER_MEDIA_EXTS)}) in the folder")
        return [
            InputShard(f"{i // shard_size:06d}.tar", path, groups[i : i + shard_size])
            for i in range(0, len(groups), shard_size)
        ]
    tars = [f for f in expand_paths(pattern, (".tar",)) if ".tar" in os.path.basename(f)]
    if not tars:
        raise DataError(f"{pattern}: no .tar shards match")
    names = [os.path.basename(t) for t in tars]
    if len(set(names)) < len(names):  # shards of several folders with the same names: number them
        names = [f"{i:06d}-{n}" for i, n in enumerate(names)]
    return [InputShard(n if n.endswith(".tar") else n + ".tar", t) for n, t in zip(names, tars)]


def folder_samples(root: str) -> list[tuple[str, list[str]]]:
    """(key, files) per sample of a folder tree: files sharing a webdataset key (`dir/name` before the first dot)
    form one sample (an image and its sidecar .txt / .json); only keys with an image file count."""
    by_key: dict[str, list[str]] = {}
    for d, subdirs, files in os.walk(root):
        subdirs.sort()
        for f in sorted(files):
            if f.startswith("."):
                continue
            rel = os.path.relpath(os.path.join(d, f), root)
            key = os.path.join(os.path.dirname(rel), f.split(".", 1)[0]) if "." in f else None
            if key:
                by_key.setdefault(key.replace(os.sep, "/"), []).append(os.path.join(d, f))
    return [(k, fs) for k, fs in sorted(by_key.items()) if any(f.lower().endswith(FOLDER_MEDIA_EXTS) for f in fs)]


def read_shard(shard: InputShard, on_error: Callable) -> Iterator[tuple[str, dict]]:
    """(key, {ext: bytes}) per sample, in order, exactly as stored."""
    if shard.groups is None:
        yield from read_tar(shard.path, on_error)
        return
    limit = max_member_bytes()
    for key, files in shard.groups:
        record: dict = {}
        for f in files:
            ext = os.path.basename(f).split(".", 1)[1].lower()
            try:
                if os.path.getsize(f) > limit:  # as the tar reader does: never read, the sample is skipped
                    record.setdefault(TOO_LARGE_KEY, []).append(f"{ext} ({os.path.getsize(f)} bytes > {limit})")
                    continue
                with open(f, "rb") as fh:
                    record[ext] = fh.read()
            except OSError as e:
                on_error(e, f)
        yield key, record


def count_samples(shard: InputShard) -> int | None:
    """Samples in a shard from its tar headers only (for the progress bar); None if it cannot be read."""
    if shard.groups is not None:
        return len(shard.groups)
    try:
        with tarfile.open(shard.path, "r:") as tf:
            return len({_member_key(m.name) for m in tf.getmembers() if m.isreg() and _member_key(m.name)})
    except Exception:  # a damaged shard: read_tar counts it when it is processed
        return None


def _member_key(name: str) -> str | None:
    """webdataset's sample key of a tar member: its path up to the first dot of the file name."""
    d, _, base = name.rpartition("/")
    if "." not in base or base.startswith("__"):
        return None
    return f"{d}/{base.split('.', 1)[0]}" if d else base.split(".", 1)[0]


def load_questions(path: str) -> list[str]:
    """Questions from a text file (one per line) or a JSON list of strings."""
    try:
        text = open(os.path.expanduser(path), encoding="utf-8").read()
    except OSError as e:
        raise ConfigError(f"--questions {path}: {e.strerror or e}") from None
    if path.endswith(".json"):
        qs = json.loads(text)
        if not isinstance(qs, list) or not all(isinstance(q, str) for q in qs):
            raise ConfigError(f"--questions {path}: expected a JSON list of strings")
    else:
        qs = [line.strip() for line in text.splitlines()]
    qs = [q for q in qs if q]
    if not qs:
        raise ConfigError(f"--questions {path} holds no questions")
    return qs


# --------------------------------------------------------------------------- media and prompts


def _member(record: dict, key: str, media_key: str | None, exts: tuple[str, ...], kind: str) -> bytes:
    """The bytes of a sample's `kind` member (`media_key`, else the first of `exts`); BadSample when unusable."""
    if record.get(TOO_LARGE_KEY):
        raise BadSample("member_too_large", f"not read: {', '.join(record[TOO_LARGE_KEY])}", key)
    value = record.get(media_key) if media_key else next((record[k] for k in exts if k in record), None)
    if value is None:
        raise BadSample(f"missing_{kind}", f"no {media_key or '/'.join(exts)} member", key)
    return value


def image_media(record: dict, key: str, media_key: str | None, model) -> list:
    """A sample's image (decoded, RGB) for a prompt with one <image> marker."""
    return [decode_image(_member(record, key, media_key, IMAGE_KEYS, "image"))]


def video_media(record: dict, key: str, media_key: str | None, model) -> list:
    """A sample's video as the model's `video_frames` frames, sampled as its training loader samples them."""
    from lmm.data.video import sample_frames

    return [Video(sample_frames(_member(record, key, media_key, VIDEO_EXTENSIONS, "video"), model.config.video_frames))]


def audio_media(record: dict, key: str, media_key: str | None, model) -> list:
    """A sample's audio clip, decoded and resampled to the model's audio encoder's rate."""
    from lmm.data.audio import decode_audio

    if "audio" not in model.encoders:
        raise ConfigError("--media audio needs a model with an audio encoder (encoders.audio in its config)")
    rate = getattr(model.encoders["audio"], "sampling_rate", 16_000)
    data = _member(record, key, media_key, AUDIO_EXTENSIONS, "audio")
    wave = decode_audio(data, sampling_rate=rate)
    try:
        check_audio_length(model, "audio", wave)  # more windows than the encoder takes: a counted skip, not a crash
    except ValueError as e:
        raise BadSample("audio_too_long", str(e)[:200], key) from None
    return [Audio(wave, rate)]


# media kind -> (marker in prompts, reader: (record, key, media_key, model) -> the sample's media items, the list
# `prepare_inputs` takes for its marker: PIL images, `Video`s of sampled frames, `Audio` waveforms)
MEDIA_READERS: dict[str, tuple[str, Callable]] = {
    "image": (IMAGE_TOKEN, image_media),
    "video": (VIDEO_MARKER, video_media),
    "audio": ("<audio>", audio_media),
}


@dataclass
class Question:
    """One prompt row asked of every sample: the model's input text and what a conversation shows the user."""

    prompt: str
    user: str
    question: str | None = None


def build_questions(cfg: LabelConfig, model) -> list[Question]:
    marker = MEDIA_READERS[cfg.media][0]
    qs = load_questions(cfg.questions) if cfg.task == "vqa" else [None]
    out = []
    for q in qs:
        template = cfg.prompt
        if template is None:  # a built-in prompt: the media's own marker in place of <image>
            template = (CHAT_TASK_TEXT if cfg.chat else TASK_PROMPTS)[cfg.task].replace(IMAGE_TOKEN, marker)
        filled = template.replace("{question}", q) if q is not None else template
        if cfg.chat:
            text = filled
            user = text if marker in text else f"{marker}\n{text}"
            from lmm.chat import render_messages

            system = cfg.system if cfg.system is not None else model.config.system_prompt
            prompt, _ = render_messages(model.tokenizer, [{"role": "user", "content": user}], system_prompt=system)
        else:
            prompt = filled
            if marker not in prompt:
                prompt = marker + prompt
            user = q if q is not None else prompt.replace(marker, "").strip() or f"Describe the {cfg.media}."
            user = f"{marker}\n{user}"
        if prompt.count(marker) != 1:
            raise ConfigError(f"the prompt must hold exactly one {marker} marker: {prompt!r}")
        out.append(Question(prompt, user, q))
    return out


# --------------------------------------------------------------------------- the model side


def generation_kwargs(cfg: LabelConfig) -> dict:
    """Greedy decoding as `model.generate` / `model.chat` would run it for this prompt style."""
    kw = dict(max_new_tokens=cfg.max_new_tokens)
    if cfg.chat:
        kw.update(stop_at_end_of_chunk=False)
    return kw


@torch.no_grad()
def label_rows(
    model, cfg: LabelConfig, prompts: list[str], media: list[list], similarity: Callable | None = None
) -> list[dict]:
    """{text, score[, similarity]} per row: greedy generation in one left-padded batch, then one teacher-forced
    forward over prompt + answer for the mean log-prob of the answer's tokens (the stop token excluded);
    `similarity(images, texts) -> [float]` scores each non-empty answer against the row's first image."""
    from lmm.generation import _autocast, _check_length, _split_kwargs, generate_ids, prepare_inputs

    gen_cfg, _ = _split_kwargs(generation_kwargs(cfg))
    add_special = not cfg.chat  # a chat template writes its own special tokens (as model.chat does)
    batch = prepare_inputs(model, prompts, media, add_special_tokens=add_special)
    _check_length(model, batch, gen_cfg)
    ids = generate_ids(model, batch, gen_cfg)
    texts = [model.tokenizer.decode(r, skip_special_tokens=True) for r in ids]
    with _autocast(model):
        scores = mean_logprobs(model, batch, ids)
    rows = [{"text": t, "score": s} for t, s in zip(texts, scores)]
    keep = [i for i, t in enumerate(texts) if t.strip()]
    if similarity is not None and keep:
        for i, s in zip(keep, similarity([media[i][0] for i in keep], [texts[i] for i in keep])):
            rows[i]["similarity"] = s
    return rows


def contrastive_similarity(model) -> Callable:
    """Cosine similarity of image and text embeddings from the model's own contrastive head (lmm.retrieval)."""
    from lmm.retrieval import image_embeddings, text_embeddings

    def score(images: list, texts: list[str]) -> list[float]:
        return (image_embeddings(model, images) * text_embeddings(model, texts)).sum(-1).tolist()

    return score


def mean_logprobs(model, batch: dict, answers: list[list[int]]) -> list[float]:
    """Mean log p(answer token | prompt, earlier answer tokens) per row (NaN for an empty answer): the prompt
    stays left-padded, the answers follow it right-padded, so every row's positions are those of decoding."""
    B, P = batch["input_ids"].shape
    L = max((len(a) for a in answers), default=0)
    if L == 0:
        return [math.nan] * B
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    ans = torch.full((B, L), pad, dtype=torch.long)
    ans_mask = torch.zeros(B, L, dtype=batch["attention_mask"].dtype)
    labels = torch.full((B, P + L), -100, dtype=torch.long)
    for b, a in enumerate(answers):
        if a:
            ans[b, : len(a)] = torch.tensor(a)
            ans_mask[b, : len(a)] = 1
            labels[b, P : P + len(a)] = torch.tensor(a)
    out = model(
        torch.cat([batch["input_ids"], ans], 1),
        torch.cat([batch["attention_mask"], ans_mask], 1),
        pixel_values=batch.get("pixel_values"),
        frame_mask=batch.get("frame_mask"),  # videos of different lengths
        media_inputs=batch.get("media_inputs"),  # other modalities
        labels=labels,
        return_logits=False,
        **({"media_frame_mask": batch["media_frame_mask"]} if batch.get("media_frame_mask") is not None else {}),
    )
    total = out.token_losses.float().sum(1).cpu()
    return [-float(total[b]) / len(a) if a else math.nan for b, a in enumerate(answers)]


# --------------------------------------------------------------------------- one shard


def _prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Run `items` in a thread `depth` steps ahead (image decoding overlaps the model); errors re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    end = object()

    def work():
        try:
            for x in items:
                q.put((x, None))
        except BaseException as e:  # handed to the consumer
            q.put((None, e))
        q.put((end, None))

    threading.Thread(target=work, daemon=True).start()
    while True:
        x, err = q.get()
        if err is not None:
            raise err
        if x is end:
            return
        yield x


class ShardWriter:
    """A webdataset tar written to a temp file beside `path` and renamed over it on `commit` (atomic: a reader
    sees no file or the whole shard). Member headers carry no time or owner, so the bytes depend on content only."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
        self.file = open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT)

    def write(self, key: str, members: dict[str, bytes]) -> None:
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            self.tar.addfile(info, io.BytesIO(data))

    def commit(self) -> None:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _row_reason(cfg: LabelConfig, row: dict) -> str | None:
    if not row["text"].strip():
        return "empty_output"
    if cfg.min_score is not None and row["score"] < cfg.min_score:
        return "low_score"
    if cfg.min_similarity is not None and row.get("similarity", -math.inf) < cfg.min_similarity:
        return "low_similarity"
    return None


class Labeller:
    """Labels shards with one loaded model; `label_shard` writes one output shard and returns its counts."""

    def __init__(self, model, cfg: LabelConfig, bar=None):
        self.model, self.cfg, self.bar = model, cfg, bar
        self.questions = build_questions(cfg, model)
        self.model_id = cfg.model_id or model.config.name or os.path.basename(os.path.normpath(cfg.model))
        self.reader = MEDIA_READERS[cfg.media][1]
        self.similarity = None
        if cfg.similarity:
            self.similarity = contrastive_similarity(model)
        elif cfg.clip_model:
            from lmm.clip_score import ClipSimilarity

            self.similarity = ClipSimilarity(cfg.clip_model, cfg.clip_checkpoint, model.device)

    def _decoded(self, shard: InputShard, counts: Counter) -> Iterator:
        """(key, members, media, None) for each readable sample, (key, None, None, reason) for a skipped one."""

        def on_error(exn, path):
            counts["truncated_shard"] += 1
            logger.warning("%s: %s: %s", path, type(exn).__name__, exn)

        for key, record in read_shard(shard, on_error):
            try:
                for ext in (f"{self.cfg.field}.txt", f"{self.cfg.field}.json"):
                    if ext in record:
                        raise ConfigError(
                            f"{shard.path}: sample {key} already has a {ext} member; pick another --field"
                        )
                yield key, record, self.reader(record, key, self.cfg.image_key, self.model), None
            except BadSample as e:
                logger.warning("skipping sample %s of %s (%s)", key, shard.path, e)
                yield key, None, None, e.reason

    def _chunks(self, shard: InputShard, counts: Counter) -> Iterator[list]:
        per = max(1, self.cfg.batch_size // len(self.questions))  # samples per batch: all of a sample's rows
        chunk: list = []
        for item in self._decoded(shard, counts):
            chunk.append(item)
            if sum(1 for c in chunk if c[1] is not None) >= per:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def label_shard(self, shard: InputShard, out_path: str) -> dict:
        cfg, counts = self.cfg, Counter()
        answers_dropped: Counter = Counter()
        seen: set[str] = set()
        writer = ShardWriter(out_path)
        try:
            n_in = 0
            for chunk in _prefetch(self._chunks(shard, counts)):
                good = [c[:3] for c in chunk if c[1] is not None]
                counts.update(c[3] for c in chunk if c[3] is not None)
                n_in += len(chunk)
                prompts = [q.prompt for _ in good for q in self.questions]
                media = [m for _, _, m in good for _ in self.questions]
                rows = label_rows(self.model, cfg, prompts, media, self.similarity) if good else []
                for i, (key, record, _) in enumerate(good):
                    mine = rows[i * len(self.questions) : (i + 1) * len(self.questions)]
                    reasons = [_row_reason(cfg, r) for r in mine]
                    kept = [(q, r) for q, r, why in zip(self.questions, mine, reasons) if why is None]
                    answers_dropped.update(why for why in reasons if why is not None)
                    if not kept:
                        counts[reasons[0]] += 1
                        continue
                    if cfg.dedup:
                        digest = hashlib.sha256(json.dumps([r["text"] for _, r in kept]).encode()).hexdigest()
                        if digest in seen:
                            counts["duplicate"] += 1
                            continue
                        seen.add(digest)
                    writer.write(key, {**record, **self.new_members(kept)})
                    counts["kept"] += 1
                if self.bar is not None:
                    self.bar.update(len(chunk))
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        stats = {"shard": shard.name, "input": shard.path, "model": self.model_id}
        stats.update(samples=n_in, kept=counts.pop("kept", 0))
        stats["dropped"] = dict(sorted(counts.items()))
        if len(self.questions) > 1:
            stats["answers_dropped"] = dict(sorted(answers_dropped.items()))
        return stats

    def new_members(self, kept: list[tuple[Question, dict]]) -> dict[str, bytes]:
        """FIELD.txt (the text; VQA: one answer per line) and FIELD.json (model, prompts, scores, conversation)."""
        rnd = lambda x: None if x is None or math.isnan(x) else round(x, 6)  # noqa: E731
        meta: dict = {"model": self.model_id}
        marker, conv = MEDIA_READERS[self.cfg.media][0], []
        for j, (q, r) in enumerate(kept):
            conv += [
                {"from": "human", "value": q.user if j == 0 else q.user.replace(marker, "").strip()},
                {"from": "gpt", "value": r["text"]},
            ]
        if self.cfg.task == "vqa":
            meta["qa"] = [
                {"question": q.question, "prompt": q.prompt, "answer": r["text"], "score": rnd(r["score"])}
                | ({"similarity": rnd(r["similarity"])} if "similarity" in r else {})
                for q, r in kept
            ]
            text = "\n".join(r["text"] for _, r in kept)
        else:
            (q, r), text = kept[0], kept[0][1]["text"]
            meta.update(prompt=q.prompt, text=text, score=rnd(r["score"]))
            if "similarity" in r:
                meta["similarity"] = rnd(r["similarity"])
        meta["conversations"] = conv
        return {
            f"{self.cfg.field}.txt": text.encode("utf-8"),
            f"{self.cfg.field}.json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
        }


# --------------------------------------------------------------------------- the run


def rank_and_world() -> tuple[int, int]:
    """This process's share of the shards, from the launcher's RANK / WORLD_SIZE (torchrun sets both)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world


def _check_plan(cfg: LabelConfig, shards: list[InputShard]) -> None:
    """Record the run's settings in OUT/label.json; a relaunch with other settings or inputs is refused."""
    plan = {"settings": cfg.fingerprint(), "shards": [[s.name, s.path, len(s.groups or [])] for s in shards]}
    path = os.path.join(cfg.output, PLAN_FILE)
    if not os.path.exists(path):
        write_json_atomic(path, plan)
    with open(path) as f:
        old = json.load(f)
    if old != json.loads(json.dumps(plan)):
        before, now = old.get("settings", {}), plan["settings"]
        diff = sorted(k for k in {*before, *now} if before.get(k, ...) != now.get(k, ...))
        what = f"settings ({', '.join(diff)})" if diff else "inputs"
        raise ConfigError(
            f"{cfg.output} holds a labelling run with other {what}; relaunch with the same ones to resume, "
            "or pick a new --output"
        )


def _remove_leftovers(out: str, name: str) -> None:
    """Temp files a killed run left for this shard (only this rank writes it)."""
    for f in os.listdir(out):
        if f == f"{name}.partial" or f.startswith(f".{name}.partial.tmp-"):
            os.remove(os.path.join(out, f))


def shard_done(out: str, name: str) -> bool:
    return os.path.isfile(os.path.join(out, name)) and os.path.isfile(os.path.join(out, STATS_DIR, name + ".json"))


def write_summary_if_complete(cfg: LabelConfig, shards: list[InputShard]) -> dict | None:
    """OUT/summary.json from every shard's stats once all are done (by whichever rank finishes last)."""
    if not all(shard_done(cfg.output, s.name) for s in shards):
        return None
    stats = [json.load(open(os.path.join(cfg.output, STATS_DIR, s.name + ".json"))) for s in shards]
    dropped: Counter = Counter()
    answers: Counter = Counter()
    for s in stats:
        dropped.update(s["dropped"])
        answers.update(s.get("answers_dropped", {}))
    summary = {
        "shards": len(shards),
        "samples": sum(s["samples"] for s in stats),
        "kept": sum(s["kept"] for s in stats),
        "dropped": dict(sorted(dropped.items())),
        "field": cfg.field,
        "model": sorted({s["model"] for s in stats}),
        "settings": cfg.fingerprint(),
    }
    if answers:
        summary["answers_dropped"] = dict(sorted(answers.items()))
    write_json_atomic(os.path.join(cfg.output, SUMMARY_FILE), summary)
    return summary


def run_label(cfg: LabelConfig, model=None) -> dict:
    """Label this rank's unfinished shards; returns {rank, shards, done, skipped, samples, seconds (labelling, after
    the model loaded), samples_per_s, summary (None until every rank's shards are done)}."""
    cfg.validate()
    rank, world = rank_and_world()
    shards = plan_shards(cfg.input, cfg.shard_size)
    os.makedirs(os.path.join(cfg.output, STATS_DIR), exist_ok=True)
    _check_plan(cfg, shards)
    mine = [s for i, s in enumerate(shards) if i % world == rank]
    todo = [s for s in mine if not shard_done(cfg.output, s.name)]
    result = {"rank": rank, "world_size": world, "shards": len(mine), "skipped": len(mine) - len(todo)}
    t0, samples = time.perf_counter(), 0
    if todo:
        if model is None:
            from lmm.presets import load

            device = cfg.device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
            model = load(cfg.model, device=device)
        model.eval()
        result["load_seconds"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        bar = _progress_bar(cfg, todo, rank)
        labeller = Labeller(model, cfg, bar)
        for s in todo:
            _remove_leftovers(cfg.output, s.name)
            stats = labeller.label_shard(s, os.path.join(cfg.output, s.name) + ".partial")
            # stats first, then the shard: a shard file only exists beside its stats
            write_json_atomic(os.path.join(cfg.output, STATS_DIR, s.name + ".json"), stats)
            os.replace(os.path.join(cfg.output, s.name) + ".partial", os.path.join(cfg.output, s.name))
            samples += stats["samples"]
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    result.update(done=len(todo), samples=samples, seconds=round(seconds, 3))
    result["samples_per_s"] = round(samples / seconds, 2) if samples and seconds > 0 else None
    result["summary"] = write_summary_if_complete(cfg, shards)
    return result


def _progress_bar(cfg: LabelConfig, todo: list[InputShard], rank: int):
    if not cfg.progress or rank != 0:
        return None
    from tqdm import tqdm

    counts = [c for c in (count_samples(s) for s in todo[:4]) if c is not None]  # headers of a few shards
    total = round(sum(counts) / len(counts) * len(todo)) if counts else None  # an estimate beyond those
    return tqdm(total=total, unit="sample", desc=f"labelling {len(todo)} shard(s)", dynamic_ncols=True)


__all__ = ["LabelConfig", "Labeller", "MEDIA_READERS", "run_label", "plan_shards", "DROP_REASONS"]
