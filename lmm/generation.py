"""Generation: vision features encoded once per prompt, the LM's KV cache reused across decode steps.

Greedy, sampling (temperature, top-k, top-p) and beam search; stop on EOS or `<|endofchunk|>`; batched prompts
with left padding; streaming; and log-likelihood scoring of candidate answers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields

import torch

from lmm.decode_cache import COMPILE_BUCKET, check_cache_kind, new_cache, step_forward
from lmm.inputs import encode_batch_media, load_images, prepare_inputs  # noqa: F401 (re-exported)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    stop_at_end_of_chunk: bool = True
    seed: int | None = None
    use_cache: bool = True
    cache: str = "dynamic"  # or "static": transformers' StaticCache, preallocated and written in place
    # torch.compile the decode step (True = inductor, or a torch.compile backend); implies cache="static". Greedy
    # and sampled decoding; the first call per batch size compiles (tens of seconds on a CPU)
    compile: bool | str | Callable = False


def _split_kwargs(kwargs: dict) -> tuple[GenerationConfig, dict]:
    names = {f.name for f in fields(GenerationConfig)}
    cfg = GenerationConfig(**{k: v for k, v in kwargs.items() if k in names})
    rest = {k: v for k, v in kwargs.items() if k not in names}
    return cfg, rest


def _stop_ids(model, cfg: GenerationConfig) -> torch.Tensor:
    ids = model.tokenizer.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    eos = getattr(model.lm.generation_config, "eos_token_id", None) if hasattr(model.lm, "generation_config") else None
    if eos is not None:
        ids += list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if cfg.stop_at_end_of_chunk:
        ids.append(model.eoc_token_id)
    return torch.tensor(sorted({i for i in ids if i is not None}), device=model.device)


def _select(logits: torch.Tensor, cfg: GenerationConfig, gen: torch.Generator | None) -> torch.Tensor:
    if not cfg.do_sample:
        return logits.argmax(-1)
    logits = logits / max(cfg.temperature, 1e-5)
    if cfg.top_k > 0:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > cfg.top_p  # keep the smallest set with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _autocast(model):
    if model.device.type == "cuda" and model.embed.base.weight.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=model.embed.base.weight.dtype)
    return torch.autocast("cpu", enabled=False)


# Decode steps between checks of "has every row stopped?": the check reads a device value (a host sync), and
# without one per step the host queues the next step while the GPU still runs this one.
STOP_CHECK_EVERY = 8


@torch.no_grad()
def decode_steps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values=None,
    frame_mask=None,
    cfg: GenerationConfig | None = None,
    check_every: int = STOP_CHECK_EVERY,
    media: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Greedy or sampled decoding; yields the next token of every row (B,) per step, on the device (pad once a
    row stopped). The loop itself never waits for the device except every `check_every` steps; a consumer
    that reads each token (streaming) syncs by reading it. `media`: resampled media of any modalities
    (`encode_batch_media`), instead of image `pixel_values`."""
    cfg = cfg or GenerationConfig()
    dev = model.device
    # Without padding the LM needs no mask, and HF's mask builder then has no device value to inspect: each step
    # passes positions instead (checked here once, on the host copy the tokenizer made).
    unpadded = bool(attention_mask.all())
    input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
    B = input_ids.shape[0]
    stop = _stop_ids(model, cfg)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else int(stop[0])
    gen = torch.Generator(device=dev).manual_seed(cfg.seed) if cfg.seed is not None else None
    media_count = model.media_token_mask(input_ids).sum(1)
    check_cache_kind(cfg.cache)
    compiled = bool(cfg.compile) and cfg.use_cache
    step_model = step_forward(model, cfg.compile if compiled else False)
    with _autocast(model):
        if media is None and pixel_values is not None:
            media = model.encode_media(pixel_values.to(dev), frame_mask)
        media_kv = {} if cfg.use_cache else None  # media keys/values projected once, reused by every step
        cache = None
        if cfg.use_cache:
            kind, bucket = ("static", COMPILE_BUCKET) if compiled else (cfg.cache, 1)
            cache = new_cache(model, kind, input_ids, media, cfg.max_new_tokens, bucket)
        out = model(
            input_ids,
            None if unpadded else attention_mask,
            media=media,
            past_key_values=cache,
            use_cache=cfg.use_cache,
            media_kv=media_kv,
            logits_to_keep=1,
        )
        T0 = out.attention_mask.shape[1]  # the LM's prompt positions (spliced media included)
        unpadded = unpadded and T0 == attention_mask.shape[1]  # spliced prompts may pad: keep their mask
        # Step k's mask and positions are slices of buffers made once (no per-step concatenation or allocation).
        mask = torch.cat([out.attention_mask, out.attention_mask.new_ones(B, cfg.max_new_tokens)], 1)
        positions = torch.arange(T0, T0 + cfg.max_new_tokens, device=dev).expand(B, -1)
        raw_mask, seq = attention_mask, input_ids  # the recomputing path's inputs
        pad_row = torch.full_like(media_count, pad)
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        for step in range(cfg.max_new_tokens):
            logits = out.logits[:, -1].float()
            logits[:, model.media_ids] = float("-inf")  # media markers are inputs, never generated
            nxt = torch.where(finished, pad_row, _select(logits, cfg, gen))
            yield nxt
            finished |= torch.isin(nxt, stop)
            if (step + 1) % check_every == 0 and bool(finished.all()):
                return
            if step + 1 == cfg.max_new_tokens:
                return
            if cfg.use_cache:  # the prefill checked the `<image>` counts: steps skip that host sync
                step_mask = None if unpadded else mask[:, : T0 + step + 1]
                if compiled and step_mask is not None:
                    torch._dynamo.mark_dynamic(step_mask, 1)  # one graph for every step's mask length
                out = step_model(
                    nxt[:, None],
                    step_mask,
                    media=media,
                    position_ids=positions[:, step : step + 1] if unpadded else None,
                    past_key_values=out.past_key_values,
                    use_cache=True,
                    media_offset=media_count,
                    media_kv=media_kv,
                    logits_to_keep=1,
                    validate=False,
                )
            else:  # recompute everything (reference path for tests)
                seq, raw_mask = torch.cat([seq, nxt[:, None]], 1), torch.cat([raw_mask, raw_mask.new_ones(B, 1)], 1)
                out = model(seq, raw_mask, media=media, logits_to_keep=1)


@torch.no_grad()
def beam_search(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values=None,
    frame_mask=None,
    cfg: GenerationConfig | None = None,
    media: torch.Tensor | None = None,
) -> list[list[int]]:
    """Beam search with length penalty; returns the best continuation (token ids, stop token excluded) per row."""
    cfg = cfg or GenerationConfig(num_beams=4)
    dev, nb = model.device, cfg.num_beams
    input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
    B = input_ids.shape[0]
    stop = set(_stop_ids(model, cfg).tolist())
    rep = lambda t: t.repeat_interleave(nb, dim=0)  # noqa: E731
    media_count = rep(model.media_token_mask(input_ids).sum(1))
    with _autocast(model):
        if media is None and pixel_values is not None:
            media = model.encode_media(pixel_values.to(dev), frame_mask)
        media = rep(media) if media is not None else None
        media_kv: dict = {}  # every beam of a row has that row's media: reordering beams leaves these valid
        cache = new_cache(model, cfg.cache, input_ids, media, cfg.max_new_tokens)
        out = model(
            rep(input_ids),
            rep(attention_mask),
            media=media,
            past_key_values=cache,
            use_cache=True,
            media_kv=media_kv,
            logits_to_keep=1,
        )
        mask = out.attention_mask
        scores = torch.full((B, nb), float("-inf"), device=dev)
        scores[:, 0] = 0.0
        beams: list[list[int]] = [[] for _ in range(B * nb)]
        done: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        for step in range(cfg.max_new_tokens):
            logp = out.logits[:, -1].float().log_softmax(-1)
            logp[:, model.media_ids] = float("-inf")
            V = logp.shape[-1]
            cand = (scores.view(B * nb, 1) + logp).view(B, nb * V)
            top_s, top_i = cand.topk(2 * nb, dim=-1)
            new_scores = torch.full((B, nb), float("-inf"), device=dev)
            src = torch.arange(B * nb, device=dev)
            tokens = torch.full((B * nb,), next(iter(stop)), device=dev, dtype=torch.long)
            new_beams = list(beams)
            for b in range(B):
                k = 0
                for s, i in zip(top_s[b].tolist(), top_i[b].tolist()):
                    beam, tok = divmod(i, V)
                    if s == float("-inf"):
                        break
                    seq = beams[b * nb + beam]
                    if tok in stop:
                        done[b].append((s / max(len(seq) + 1, 1) ** cfg.length_penalty, seq))
                        continue
                    new_scores[b, k] = s
                    src[b * nb + k] = b * nb + beam
                    tokens[b * nb + k] = tok
                    new_beams[b * nb + k] = seq + [tok]
                    k += 1
                    if k == nb:
                        break
            beams, scores = new_beams, new_scores
            if all(
                len(d) >= nb
                and max(x[0] for x in d)
                >= (
                    scores[b].max().item() / (step + 1) ** cfg.length_penalty
                    if cfg.length_penalty >= 0
                    else float("inf")
                )
                for b, d in enumerate(done)
            ):
                break
            out.past_key_values.reorder_cache(src)
            mask = torch.cat([mask[src], mask.new_ones(B * nb, 1)], 1)
            out = model(
                tokens[:, None],
                mask,
                media=media,
                past_key_values=out.past_key_values,
                use_cache=True,
                media_offset=media_count,
                media_kv=media_kv,
                logits_to_keep=1,
                validate=False,
            )
        results = []
        for b in range(B):
            finals = list(done[b])
            for k in range(nb):
                if scores[b, k] > float("-inf"):
                    seq = beams[b * nb + k]
                    finals.append((scores[b, k].item() / max(len(seq), 1) ** cfg.length_penalty, seq))
            results.append(max(finals, key=lambda x: x[0])[1])
        return results


def generate_ids(model, batch: dict, cfg: GenerationConfig) -> list[list[int]]:
    """New token ids per row, stop token excluded."""
    if cfg.num_beams > 1:
        if cfg.do_sample:
            raise ValueError("beam search with sampling is not supported; set do_sample=False or num_beams=1")
        if cfg.compile:
            raise ValueError("compile applies to greedy and sampled decoding; set num_beams=1 or compile=False")
        with _autocast(model):
            media = encode_batch_media(model, batch)
        return beam_search(model, batch["input_ids"], batch["attention_mask"], cfg=cfg, media=media)
    stop = set(_stop_ids(model, cfg).tolist())
    B = batch["input_ids"].shape[0]
    rows: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B
    with _autocast(model):
        media = encode_batch_media(model, batch)
    steps = list(decode_steps(model, batch["input_ids"], batch["attention_mask"], cfg=cfg, media=media))
    # read back once, after the loop
    for nxt in torch.stack(steps, 0).cpu().tolist() if steps else []:
        for b, t in enumerate(nxt):
            if not finished[b]:
                if t in stop:
                    finished[b] = True
                else:
                    rows[b].append(t)
    return rows


def _check_length(model, batch: dict, cfg: GenerationConfig) -> None:
    limit = getattr(model.lm.config, "max_position_embeddings", None)
    n = batch["input_ids"].shape[1] + cfg.max_new_tokens
    if limit is not None and n > limit:
        raise ValueError(
            f"prompt of {batch['input_ids'].shape[1]} tokens + max_new_tokens={cfg.max_new_tokens} "
            f"exceeds the LM's context of {limit} tokens; shorten the prompt or max_new_tokens"
        )


def generate_text(model, prompts, images=None, add_special_tokens: bool = True, videos=None, audios=None, **kwargs):
    single = isinstance(prompts, str)
    if single:
        prompts, images = [prompts], [images or []]
        videos, audios = ([videos] if videos else None), ([audios] if audios else None)
    cfg, rest = _split_kwargs(kwargs)
    if rest:
        raise TypeError(f"unknown generation arguments: {sorted(rest)}")
    batch = prepare_inputs(model, prompts, images, add_special_tokens, videos, audios)
    _check_length(model, batch, cfg)
    rows = generate_ids(model, batch, cfg)
    texts = [model.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
    return texts[0] if single else texts


def stream_text(
    model, prompt: str, images=None, add_special_tokens: bool = True, videos=None, audios=None, **kwargs
) -> Iterator[str]:
    cfg, rest = _split_kwargs(kwargs)
    if rest:
        raise TypeError(f"unknown generation arguments: {sorted(rest)}")
    if cfg.num_beams > 1:
        raise ValueError("streaming needs num_beams=1")
    batch = prepare_inputs(
        model, [prompt], [images or []], add_special_tokens, [videos] if videos else None, [audios] if audios else None
    )
    _check_length(model, batch, cfg)
    stop = set(_stop_ids(model, cfg).tolist())
    ids: list[int] = []
    sent = ""
    with _autocast(model):
        media = encode_batch_media(model, batch)
    for nxt in decode_steps(model, batch["input_ids"], batch["attention_mask"], cfg=cfg, media=media):
        t = int(nxt[0])
        if t in stop:
            break
        ids.append(t)
        text = model.tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            continue
        if len(text) > len(sent):
            yield text[len(sent) :]
            sent = text
    text = model.tokenizer.decode(ids, skip_special_tokens=True)  # whatever was held back at the end
    if len(text) > len(sent):
        yield text[len(sent) :]


@torch.no_grad()
def score_candidates(
    model,
    prompts: Sequence[str],
    images,
    candidates: Sequence[str],
    batch_size: int = 16,
    add_special_tokens: bool = True,
    videos=None,
    audios=None,
) -> torch.Tensor:
    """Summed log p(candidate | prompt, images) for every (prompt, candidate): (len(prompts), len(candidates)).

    Each prompt and its images run once; the first candidate token is read from the prompt's last logits and
    longer candidates continue from a copy of the prompt's KV cache, so scoring C candidates costs about one
    prompt forward, not C. `batch_size` bounds the rows of one forward (prompts, or prompt x candidate pairs)."""
    images = images if images is not None else [[] for _ in prompts]
    if len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    cand_ids = [model.tokenizer(c, add_special_tokens=False)["input_ids"] for c in candidates]
    if any(len(c) == 0 for c in cand_ids):
        raise ValueError("empty candidate string")
    dev = model.device
    first = torch.tensor([c[0] for c in cand_ids], device=dev)
    longer = [j for j, c in enumerate(cand_ids) if len(c) > 1]
    scores = torch.zeros(len(prompts), len(candidates))
    for s in range(0, len(prompts), batch_size):
        window = slice(s, s + batch_size)
        enc = prepare_inputs(
            model,
            prompts[window],
            images[window],
            add_special_tokens,
            videos[window] if videos is not None else None,
            audios[window] if audios is not None else None,
        )
        ids = enc["input_ids"].to(dev)
        P = ids.shape[0]
        with _autocast(model):
            media = encode_batch_media(model, enc)
            media_kv: dict = {}  # what a bridge keeps of the prompt's media (keys/values), reused per candidate
            out = model(
                ids, enc["attention_mask"], media=media, use_cache=bool(longer), media_kv=media_kv, logits_to_keep=1
            )
            total = out.logits[:, -1].float().log_softmax(-1)[:, first]  # (P, C): log p(first token)
            media_count = model.media_token_mask(ids).sum(1)
            group = max(1, batch_size // P)
            for g in range(0, len(longer), group):
                total[:, longer[g : g + group]] += _continuation_logp(
                    model, out, media, media_count, [cand_ids[j] for j in longer[g : g + group]], media_kv
                )
        scores[s : s + P] = total.cpu()
    return scores


def _take_rows(value, rows: torch.Tensor):
    """A media_kv entry (a tensor or a tuple of tensors, batch first) for the given batch rows."""
    if isinstance(value, torch.Tensor):
        return value[rows]
    return type(value)(_take_rows(v, rows) for v in value)


def _continuation_logp(
    model, prompt_out, media, media_count: torch.Tensor, cands: list[list[int]], media_kv: dict | None = None
) -> torch.Tensor:
    """log p(tokens 2.. of each candidate | prompt, token 1..) for P prompts x K candidates: (P, K)."""
    P, K, dev = media_count.shape[0], len(cands), model.device
    L = max(len(c) for c in cands)
    pad = model.tokenizer.pad_token_id or 0
    inp = torch.full((K, L), pad, dtype=torch.long)
    lab = torch.full((K, L), -100, dtype=torch.long)
    cmask = torch.zeros(K, L, dtype=torch.long)
    for k, c in enumerate(cands):  # right-padded: a pad after a candidate never changes its tokens' logits
        inp[k, : len(c)], lab[k, 1 : len(c)], cmask[k, : len(c)] = torch.tensor(c), torch.tensor(c[1:]), 1
    rows = torch.arange(P, device=dev).repeat_interleave(K)  # (P*K,) prompt of each pair
    cache = copy.deepcopy(prompt_out.past_key_values)
    cache.reorder_cache(rows)
    mask = torch.cat([prompt_out.attention_mask[rows], cmask.repeat(P, 1).to(dev)], 1)
    out = model(
        inp.repeat(P, 1),
        mask,
        media=media[rows] if media is not None else None,
        past_key_values=cache,
        use_cache=True,
        media_offset=media_count[rows],
        media_kv={k: _take_rows(v, rows) for k, v in media_kv.items()} if media_kv else None,
        labels=lab.repeat(P, 1),
        return_logits=False,
    )
    return -out.token_losses.sum(1).view(P, K).float()
