"""Batches whose frozen computations are done once: vision features per distinct image and the LM's hidden states
below the lowest cross-attention layer per distinct text (and audio features per distinct clip).

With a flamingo bridge, nothing below the first bridge layer depends on the images, and the vision tower is frozen;
when the LM (no LoRA) and the `<image>`/`<|endofchunk|>` embedding rows are frozen too, a training step only needs
the top layers. `frozen_cache: true` builds this source from the run's datasets (any conversation, pair or
interleaved-image data: every record once per epoch, in a seeded order) instead of the streaming loader. Batches
hold `vision_features` and `prefix_hidden` in place of `pixel_values` (and `media_features={"audio": ...}` in
place of `media_inputs`: each clip decoded and encoded once, all its 30 s chunks) and go straight into
`LMM.forward`; their loss equals the full forward's on the same rows. This is what lets the embedded easy-vqa
demo train on a 2-core CPU in minutes.

What cannot be cached is refused with a ConfigError saying why (`check_data_config` at validation, `check_model`
once the model is built), and the cache refuses to grow past `frozen_cache_max_gib` (default: half the RAM).
Conversations are rendered with the model's default system prompt, as `model.chat` renders them.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lmm.chat import with_system_prompt
from lmm.config import ConfigError
from lmm.data.text import IGNORE_INDEX, Tokenized, encode_conversation, encode_document, media_token_ids, truncate
from lmm.tokens import IMAGE_TOKEN


@dataclass
class ConversationSample:
    image: str | list  # path of the image the `<image>` marker refers to (a list: one per marker, in order)
    messages: list[dict]  # role/content messages, content strings with `<image>` markers


@dataclass
class TokenizedSample:
    """A sample already tokenised (ids, labels) with its media in order (paths, or raw bytes/PIL values)."""

    input_ids: tuple
    labels: tuple
    media: tuple
    kinds: tuple = ()  # the modality of each media item ("image", "audio" ...); empty: all images


Sample = ConversationSample | TokenizedSample


class CachedConversationBatches:
    """Seeded, resumable epochs over samples, with frozen features precomputed (see the module docstring).

    samples: ConversationSample (rendered with the model's system prompt) or TokenizedSample. `max_bytes` bounds
    the cache (ConfigError before the expensive part when it would not fit). `epochs`: None cycles forever."""

    def __init__(
        self,
        model,
        samples: list[Sample],
        batch_size: int,
        seed: int = 0,
        feature_batch: int = 64,
        progress=None,
        balance_answers: bool = False,
        max_bytes: int | None = None,
        epochs: int | None = None,
    ):
        self.model, self.batch_size, self.seed, self.epochs = model, batch_size, seed, epochs
        tokenized = self._tokenize(samples)
        self.weights = answer_balanced_weights(tokenized) if balance_answers else None
        seq_index: dict[tuple, int] = {}
        seqs, index, items = [], {}, {}  # items: modality -> distinct media values, in first-seen order
        self.rows = []  # (sequence index, {modality: media indices in text order}) per sample
        for s in tokenized:
            key = (s.input_ids, s.labels)
            if key not in seq_index:
                seq_index[key] = len(seqs)
                seqs.append(key)
            media: dict[str, list] = {}
            for m, kind in zip(s.media, s.kinds or ("image",) * len(s.media)):
                if kind != "image" and kind not in model.encoders:
                    raise ConfigError(f"frozen_cache: a sample holds {kind} media, but the model has no {kind} encoder")
                mk = (kind, _media_key(m))
                if mk not in index:
                    index[mk] = len(items.setdefault(kind, []))
                    items[kind].append(m)
                media.setdefault(kind, []).append(index[mk])
            self.rows.append((seq_index[key], {k: tuple(v) for k, v in media.items()}))
        if not items:
            raise ConfigError(
                "frozen_cache: the data holds no images or audio, so there is nothing to cache below the "
                "bridge's cross-attention; set frozen_cache: false"
            )
        images = items.get("image", [])
        self.lengths = torch.tensor([len(ids) for ids, _ in seqs])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.lengths.cumsum(0)])
        self.ids = torch.tensor([t for ids, _ in seqs for t in ids])  # flat, unpadded
        self.flat_labels = torch.tensor([t for _, lab in seqs for t in lab])
        self.pad_id = model.tokenizer.pad_token_id
        self.prefix_layer = model.lowest_bridge_layer()
        self.vision_features = None
        self.media_features: dict[str, torch.Tensor] = {}  # modality -> (total chunks, N, D), clips back to back
        self.chunk_offsets: dict[str, torch.Tensor] = {}  # modality -> (clips + 1,): clip i = chunks [o[i], o[i+1])
        with torch.no_grad():
            held = 0 if max_bytes is None else self._text_bytes()  # what the text states will hold
            if images:
                first = self._encode_images(images[:feature_batch])
                held = self._check_memory(max_bytes, first, len(images), int(self.offsets[-1]))
                rest = self._encode_images(images[feature_batch:], feature_batch, progress, done=len(first))
                self.vision_features = torch.cat([first, rest]) if len(rest) else first  # (num_images, N, Dv)
            for kind in (k for k in items if k != "image"):
                held = self._encode_clips(kind, items[kind], feature_batch, max_bytes, held)
            self.prefix_hidden = self._prefix_states(feature_batch)  # (total tokens, D), unpadded
        self.num_sequences, self.num_images, self.num_samples = len(seqs), len(images), len(tokenized)
        self.num_media = {k: len(v) for k, v in items.items()}
        self.epoch, self.position = 0, 0

    # ------------------------------------------------------------------ building

    def _tokenize(self, samples: list[Sample]) -> list[TokenizedSample]:
        memo: dict = {}
        out = []
        for s in samples:
            if isinstance(s, TokenizedSample):
                out.append(s)
                continue
            enc = encode_chat(s.messages, self.model, memo)
            media = tuple(s.image) if isinstance(s.image, (list, tuple)) else (s.image,)  # images only
            out.append(TokenizedSample(tuple(enc.input_ids), tuple(enc.labels), media))
        return out

    def _encode_images(self, items: list, batch: int = 64, progress=None, done: int = 0) -> torch.Tensor:
        feats = []
        total = done + len(items)
        for i in range(0, len(items), batch):
            pix = self.model.pixel_values([_as_image(m) for m in items[i : i + batch]])
            feats.append(self.model.vision_features(pix)[:, 0, 0].cpu())
            if progress is not None:
                progress(done + min(i + batch, len(items)), total)
        return torch.cat(feats) if feats else torch.empty(0)

    def _encode_clips(self, kind: str, clips: list, batch: int, max_bytes: int | None, held: int) -> int:
        """Frozen features of every distinct clip of a modality, once: decoded as the loader decodes them, all
        their chunks through the encoder in batches of `batch` chunks; stops with a ConfigError as soon as the
        cache (what it holds already plus this modality's extrapolated total) would pass `max_bytes`."""
        from lmm.data.audio import decode_audio

        encoder = self.model.encoders[kind]
        rate = getattr(encoder, "sampling_rate", 16_000)
        feats, counts, pending, done = [], [], [], 0

        def flush():
            x = torch.cat(pending)  # (chunks, ...) of several clips
            feats.append(self.model.media_features(kind, x[None, None])[0, 0].cpu())  # (chunks, N, D)
            pending.clear()

        for i, clip in enumerate(clips):
            x = torch.as_tensor(encoder.preprocess(decode_audio(clip, sampling_rate=rate)))
            counts.append(x.shape[0])
            pending.append(x)
            if sum(p.shape[0] for p in pending) >= batch or i == len(clips) - 1:
                flush()
                done = sum(f.numel() * f.element_size() for f in feats)
                need = held + done / (i + 1) * len(clips)
                if max_bytes is not None and need > max_bytes:
                    raise ConfigError(
                        f"frozen_cache would hold {_size(need)} (with {len(clips):,} {kind} clips x "
                        f"~{_size(done / (i + 1))} of {kind} features), over the bound of {_size(max_bytes)}; "
                        f"raise frozen_cache_max_gib if the machine has the memory, or set frozen_cache: false"
                    )
        self.media_features[kind] = torch.cat(feats)
        self.chunk_offsets[kind] = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(counts).cumsum(0)])
        return held + done

    def _prefix_states(self, batch: int) -> torch.Tensor:
        """Hidden states entering the lowest bridge layer for every distinct text, stored without padding.
        Texts run in chunks of similar length (right padding, causal: a token never sees the padding)."""
        order = sorted(range(len(self.lengths)), key=lambda i: int(self.lengths[i]))
        out: torch.Tensor | None = None
        for c in range(0, len(order), batch):
            chunk = order[c : c + batch]
            T = int(self.lengths[chunk].max())
            ids = torch.full((len(chunk), T), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), T), dtype=torch.long)
            for r, i in enumerate(chunk):
                n = int(self.lengths[i])
                ids[r, :n] = self.ids[self.offsets[i] : self.offsets[i] + n]
                mask[r, :n] = 1
            h = self.model.prefix_hidden_states(ids, mask).cpu()
            if out is None:
                out = h.new_empty((int(self.offsets[-1]), h.shape[-1]))
            for r, i in enumerate(chunk):
                out[self.offsets[i] : self.offsets[i + 1]] = h[r, : int(self.lengths[i])]
        return out

    def _text_bytes(self) -> int:
        """Bytes the hidden states of every distinct text will take (one probe of one token)."""
        probe = self.model.prefix_hidden_states(self.ids[:1][None], torch.ones(1, 1, dtype=torch.long))
        return int(self.offsets[-1]) * probe.shape[-1] * probe.element_size()

    def _check_memory(self, max_bytes: int | None, first: torch.Tensor, n_images: int, n_tokens: int) -> int:
        """ConfigError when images + text states would pass `max_bytes`; else the bytes they will hold."""
        if max_bytes is None:
            return 0
        per_image = first[0].numel() * first.element_size()
        probe = self.model.prefix_hidden_states(self.ids[:1][None], torch.ones(1, 1, dtype=torch.long))
        per_token = probe.shape[-1] * probe.element_size()
        need = n_images * per_image + n_tokens * per_token
        if need > max_bytes:
            raise ConfigError(
                f"frozen_cache would hold {_size(need)} ({n_images:,} images x {_size(per_image)} of "
                f"vision features + {n_tokens:,} text tokens x {_size(per_token)} of hidden states), "
                f"over the bound of {_size(max_bytes)}; raise frozen_cache_max_gib if the machine has "
                f"the memory, or set frozen_cache: false (the loader computes them at every step)"
            )
        return need

    # ------------------------------------------------------------------ batches

    def __len__(self) -> int:
        return (len(self.rows) + self.batch_size - 1) // self.batch_size

    def _order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        if self.weights is None:
            return rng.permutation(len(self.rows))
        return rng.choice(len(self.rows), size=len(self.rows), p=self.weights)  # with replacement

    def __iter__(self):
        while self.epochs is None or self.epoch < self.epochs:
            order = self._order(self.epoch)
            while self.position < len(order):
                idx = order[self.position : self.position + self.batch_size]
                self.position += len(idx)
                yield self._batch(idx)
            self.epoch, self.position = self.epoch + 1, 0

    def _batch(self, idx: np.ndarray) -> dict:
        seqs = [self.rows[i][0] for i in idx]
        T = int(self.lengths[seqs].max())  # rows are right-padded to the longest of the batch
        B = len(seqs)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        hidden = self.prefix_hidden.new_zeros((B, T, self.prefix_hidden.shape[-1]))
        for r, s in enumerate(seqs):
            a, b = int(self.offsets[s]), int(self.offsets[s + 1])
            input_ids[r, : b - a] = self.ids[a:b]
            labels[r, : b - a] = self.flat_labels[a:b]
            hidden[r, : b - a] = self.prefix_hidden[a:b]
            mask[r, : b - a] = 1
        out = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": labels,
            "prefix_hidden": hidden,
            "prefix_layer": self.prefix_layer,
        }
        if self.vision_features is not None:
            slots = self._slots(idx, "image")
            feats = self.vision_features[slots.clamp(min=0)]  # (B, M, N, Dv); empty slots zeroed below
            feats[slots < 0] = 0
            out["vision_features"] = feats[:, :, None]
        for kind in self.media_features:
            feats, frame_mask = self._clip_features(kind, self._slots(idx, kind))
            out.setdefault("media_features", {})[kind] = feats
            if frame_mask is not None:
                out.setdefault("media_frame_mask", {})[kind] = frame_mask
        return out

    def _slots(self, idx: np.ndarray, kind: str) -> torch.Tensor:
        """(B, M) indices of each row's media of one modality in text order; -1 where a row has fewer."""
        media = [self.rows[i][1].get(kind, ()) for i in idx]
        slots = torch.full((len(idx), max(1, max(map(len, media)))), -1, dtype=torch.long)
        for r, m in enumerate(media):
            slots[r, : len(m)] = torch.tensor(m, dtype=torch.long)
        return slots

    def _clip_features(self, kind: str, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, M, F, N, D) features of the clips in `slots` (F = the most chunks among them, shorter clips zero
        padded) and, as the loader's collate gives it, a (B, M, F) mask of real chunks when their counts differ."""
        o, store = self.chunk_offsets[kind], self.media_features[kind]
        real = slots >= 0
        n = torch.where(real, o[slots.clamp(min=0) + 1] - o[slots.clamp(min=0)], 0)
        F = int(n.max().clamp(min=1))
        feats = store.new_zeros((*slots.shape, F, *store.shape[1:]))
        for b, m in real.nonzero().tolist():
            a = int(o[slots[b, m]])
            feats[b, m, : n[b, m]] = store[a : a + n[b, m]]
        if len(set(n[real].tolist())) <= 1:
            return feats, None
        frame_mask = torch.arange(F) < n[..., None]
        frame_mask[~real, 0] = True  # an empty slot keeps one (zero) chunk: no all-masked softmax
        return feats, frame_mask

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "balance_answers": self.weights is not None,
        }

    def load_state_dict(self, state: dict) -> None:
        fresh = "; resume with the run's own setting, or start fresh with checkpoint.resume=null"
        if state.get("seed") != self.seed:
            raise ConfigError(
                f"the checkpoint's data order was made with seed {state.get('seed')}, this run uses "
                f"seed {self.seed}{fresh}"
            )
        saved_balance = state.get("balance_answers", False)
        if saved_balance != (self.weights is not None):
            raise ConfigError(
                f"the checkpoint's data order was made with balance_answers={saved_balance}, this "
                f"run uses balance_answers={self.weights is not None}{fresh}"
            )
        self.epoch, self.position = state["epoch"], state["position"]


def _prompt_answer(s: Sample) -> tuple:
    """(prompt, answer) of a sample: everything before the final assistant turn, and that turn (for tokenised
    samples: the tokens before the first labelled one, and the labelled ones)."""
    if isinstance(s, ConversationSample):
        return repr(s.messages[:-1]), s.messages[-1]["content"]
    first = next((i for i, lab in enumerate(s.labels) if lab != IGNORE_INDEX), len(s.labels))
    return s.input_ids[:first], tuple(lab for lab in s.labels if lab != IGNORE_INDEX)


def answer_balanced_weights(samples: list[Sample]) -> np.ndarray:
    """Sampling probabilities that make every answer of a prompt equally likely, keeping each prompt's share.

    A prompt is everything before the final assistant turn; its answer is that turn. Where a question's answers
    are skewed ("is there a red shape?" is "no" 7 times in 8 on easy-vqa), a model can score well from the text
    alone and never learns to look; balancing removes that prior (the idea behind VQA v2's balanced pairs)."""
    keys = [_prompt_answer(s) for s in samples]
    per_answer = Counter(keys)  # (prompt, answer) -> samples
    per_prompt = Counter(q for q, _ in keys)  # prompt -> samples
    answers_of = Counter(q for q, _ in per_answer)  # prompt -> distinct answers
    w = np.array([per_prompt[q] / (answers_of[q] * per_answer[(q, a)]) for q, a in keys])
    return w / w.sum()


def encode_chat(messages: list[dict], model, memo: dict, markers=()) -> Tokenized:
    """A conversation tokenised with the model's default system prompt (as `model.chat` renders it), labels on
    the assistant turns (never on `<image>` or the other `markers`); `memo` keeps each distinct conversation's
    result (rendering a chat template is slow)."""
    key = (repr(messages), tuple(sorted(markers)))
    if key not in memo:
        messages = with_system_prompt(messages, model.config.system_prompt)
        memo[key] = encode_conversation(messages, model.tokenizer, markers)
    return memo[key]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _media_key(value):
    """What makes two media the same image: the path, or the bytes' digest."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return ("sha1", hashlib.sha1(bytes(value)).hexdigest())
    if isinstance(value, dict) and value.get("bytes"):
        return ("sha1", hashlib.sha1(bytes(value["bytes"])).hexdigest())
    if isinstance(value, dict) and (value.get("path") or value.get("image_name")):
        return value.get("path") or value.get("image_name")
    return ("id", id(value))


def _as_image(value):
    """A path stays a path (`model.pixel_values` opens it); other media values are decoded to PIL."""
    if isinstance(value, str):
        return value
    from lmm.data.media import decode_image

    return decode_image(value)


# ---------------------------------------------------------------------- from a run config


def check_data_config(data_cfg) -> None:
    """ConfigError when the run's data is not something the frozen cache can hold (checked at validation)."""
    fix = "set frozen_cache: false to train through the streaming loader"
    stages = data_cfg.resolved_stages()
    if len(stages) > 1:
        raise ConfigError(
            f"frozen_cache draws every sample once per epoch from one mixture; a curriculum "
            f"(data.stages) needs the loader: {fix}"
        )
    if data_cfg.packing:
        raise ConfigError(
            f"frozen_cache builds one row per sample (the replayed top layers take unpacked rows): set "
            f"data.packing: false, or {fix}"
        )
    datasets = stages[0].datasets
    for d in datasets:
        if d.format == "video":
            raise ConfigError(
                f"dataset {d.display_name()!r}: frozen_cache holds one feature set per image, and video "
                f"clips are frames sampled anew: {fix}"
            )
        if d.repeat != 1 or d.repeat_buffer:
            raise ConfigError(f"dataset {d.display_name()!r}: repeat sampling is a loader feature: {fix}")
        if d.loss_weight != 1.0:
            raise ConfigError(
                f"dataset {d.display_name()!r}: per-dataset loss weights need the loader's task ids: {fix}"
            )
    if len({d.weight for d in datasets}) > 1:
        raise ConfigError(
            f"frozen_cache concatenates its datasets (every sample once per epoch), so mixture weights "
            f"cannot apply: give the datasets equal weights, or {fix}"
        )


def check_model(model) -> None:
    """ConfigError when the model's layers below the bridge are not frozen functions of the text."""
    why = "; set frozen_cache: false"
    if model.config.bridge.kind != "flamingo":
        raise ConfigError(
            f"frozen_cache needs the flamingo bridge (cross-attention layers over a text-only prefix); "
            f"the {model.config.bridge.kind} bridge puts the media into the LM's input{why}"
        )
    if model.config.lora.r > 0:
        raise ConfigError(
            f"frozen_cache caches the LM's hidden states, but LoRA (lora.r={model.config.lora.r}) "
            f"trains the LM's layers{why}"
        )


def default_max_bytes() -> int | None:
    """Half of the machine's physical memory (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return None


def dataset_samples(data_cfg, model, log: Callable[[str], None] = print) -> list[TokenizedSample]:
    """Every usable record of the run's datasets in file order, tokenised as the loader does it (max_tokens,
    max_images, labels), except that conversations get the model's default system prompt, as `model.chat` renders
    them at inference; unusable records are skipped and counted."""
    from lmm.data.encode import SampleEncoder
    from lmm.data.errors import BadSample, format_counts
    from lmm.data.ordered import iter_dataset

    tok = model.tokenizer
    image_id, _ = media_token_ids(tok)
    limiter = SampleEncoder(
        tok,
        model.image_processor,
        data_cfg.max_tokens,
        data_cfg.max_images,
        data_cfg.too_many_images,
        data_cfg.num_frames,
    )
    memo: dict = {}
    bad: Counter = Counter()
    out = []
    for d in data_cfg.resolved_stages()[0].datasets:
        for key, sample, reason in iter_dataset(d, data_cfg.seed):
            if sample is None:
                bad[reason] += 1
                continue
            try:
                sample = limiter.limit_media(sample)
                refs = sample.media_refs
                if any(r.kind == "video" for r in refs):
                    raise ConfigError(
                        f"dataset {d.display_name()!r}: record {key} holds a video; frozen_cache holds one "
                        "feature set per image or clip, and video frames are sampled anew; set frozen_cache: false"
                    )
                for r in refs:
                    if r.kind != "image":
                        _check_clip(model, r, key)
                markers = {r.marker for r in refs}
                if sample.kind == "conversation":
                    enc = encode_chat(sample.messages, model, memo, markers)
                else:
                    enc = encode_document(sample.parts, tok)
                ids = {m: image_id if m == IMAGE_TOKEN else tok.convert_tokens_to_ids(m) for m in markers}
                for m, i in ids.items():
                    if enc.input_ids.count(i) != sum(r.marker == m for r in refs):
                        reason = "image_count_mismatch" if m == IMAGE_TOKEN else "audio_count_mismatch"
                        n = sum(r.marker == m for r in refs)
                        raise BadSample(reason, f"{enc.input_ids.count(i)} {m} tokens for {n} media", key)
                enc, _ = truncate(enc, data_cfg.max_tokens, image_id)
            except BadSample as e:
                bad[e.reason] += 1
                continue
            kept = {m: enc.input_ids.count(i) for m, i in ids.items()}  # media whose marker survived the cut
            seen: Counter = Counter()
            media = []
            for r in refs:
                seen[r.marker] += 1
                if seen[r.marker] <= kept[r.marker]:
                    media.append(r)
            out.append(
                TokenizedSample(
                    tuple(enc.input_ids),
                    tuple(enc.labels),
                    tuple(r.value for r in media),
                    tuple(r.kind for r in media),
                )
            )
    if bad:
        log(f"frozen cache: skipped {sum(bad.values())} records ({format_counts(dict(bad))})")
    if not out:
        raise ConfigError(
            "frozen_cache: no usable sample in the run's datasets (check format, image_root and "
            f"max_tokens with `lmm data inspect`){'; skipped: ' + format_counts(dict(bad)) if bad else ''}"
        )
    return out


def _check_clip(model, ref, key: str) -> None:
    """BadSample (counted, as the loader counts it) for a clip the model cannot take: no encoder of its kind, a file
    that does not decode, or more windows than the encoder's max_chunks."""
    from lmm.data.audio import decode_audio
    from lmm.data.errors import BadSample

    encoder = model.encoders[ref.kind] if ref.kind in model.encoders else None
    if encoder is None:
        raise BadSample("no_encoder", f"{ref.kind} media but the model has no {ref.kind} encoder", key)
    samples = decode_audio(ref.value, sampling_rate=getattr(encoder, "sampling_rate", 16_000))
    per_chunk, limit = getattr(encoder, "chunk_samples", None), getattr(encoder, "max_chunks", None)
    if per_chunk and limit and math.ceil(len(samples) / per_chunk) > limit:
        raise BadSample(f"{ref.kind}_too_long", f"{len(samples) / per_chunk:.1f} windows > max_chunks={limit}", key)


def frozen_cache_source(cfg, model, log: Callable[[str], None] = print) -> CachedConversationBatches:
    """The frozen-cache batch source for a run config (`frozen_cache: true`): its datasets read once, in order."""
    check_data_config(cfg.data)
    check_model(model)
    t = time.perf_counter()
    samples = dataset_samples(cfg.data, model, log)
    max_bytes = int(cfg.frozen_cache_max_gib * 2**30) if cfg.frozen_cache_max_gib is not None else default_max_bytes()
    batches = CachedConversationBatches(
        model,
        samples,
        cfg.data.batch_size,
        seed=cfg.seed,
        balance_answers=cfg.balance_answers,
        max_bytes=max_bytes,
        epochs=cfg.data.epochs,
    )
    media = ", ".join(f"{n} {'images' if k == 'image' else k + ' clips'}" for k, n in batches.num_media.items())
    log(
        f"frozen cache: {media} and {batches.num_sequences} distinct texts precomputed for "
        f"{len(samples)} samples in {time.perf_counter() - t:.0f} s"
    )
    return batches
