"""BLIP-2 Q-Former glue that touches files: its text tokenizer, BERT initialisation, stage-1 weights.

- `qformer_tokenizer`: the tokenizer of a local BERT folder, or a WordPiece vocabulary trained offline on the
  stage-1 captions; both get BLIP-2's `[DEC]` token (the first token of a caption in ITG).
- `build_qformer` / `load_bert_weights`: a `BertQFormer` sized like the BERT folder (or like the config) and
  initialised from it (queries' feed-forwards start as copies of the text ones; cross-attention starts random).
- `load_stage1`: stage-1 weights into a stage-2 (query-only) Q-Former, names and shapes checked exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lmm.adapters.qformer import BertQFormer
from lmm.config import ConfigError, QFormerConfig

DEC_TOKEN = "[DEC]"
STAGE1_FILE = "qformer.safetensors"


def wordpiece_tokenizer(texts, vocab_size: int = 2000):
    """A BERT-style (lower-cased WordPiece) `PreTrainedTokenizerFast` over `texts`, with [DEC]; built in memory.

    The vocabulary is the specials, every character seen (alone and as a `##` continuation) and then whole words
    by frequency (ties alphabetical) up to `vocab_size`; rarer words are spelled in pieces. It is the same on every
    run for the same captions: the `tokenizers` WordPiece trainer breaks ties in hash order, so two runs of one
    config would otherwise train on different token ids."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", DEC_TOKEN]
    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    chars = sorted({c for w in words for c in w})
    vocab = specials + chars + [f"##{c}" for c in chars]
    ranked = sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w))
    vocab += ranked[: max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = norm, pre, decoders.WordPiece()
    tok.post_processor = processors.BertProcessing(("[SEP]", vocab.index("[SEP]")), ("[CLS]", vocab.index("[CLS]")))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token=DEC_TOKEN,
    )


def qformer_tokenizer(bert_path: str | None = None, texts=None, vocab_size: int = 2000):
    """The BERT folder's tokenizer (plus [DEC] as bos), else a WordPiece vocabulary trained on `texts`."""
    if bert_path is None:
        if texts is None:
            raise ValueError("without qformer.bert_path, a Q-Former tokenizer is trained on the captions: pass texts")
        return wordpiece_tokenizer(texts, vocab_size)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bert_path)
    if DEC_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"bos_token": DEC_TOKEN})
    tok.bos_token = DEC_TOKEN
    return tok


def bert_config(path: str | Path) -> dict:
    p = Path(path) / "config.json"
    if not p.is_file():
        raise ConfigError(f"qformer.bert_path={path}: no config.json inside (expected a bert-base-uncased layout)")
    return json.loads(p.read_text())


def qformer_sizes(q: QFormerConfig) -> dict:
    """hidden, depth, heads, intermediate, eps: from the BERT folder's config where one is given, else `q`."""
    if q.bert_path is None:
        return dict(hidden=q.hidden, depth=q.depth, heads=q.heads, intermediate=q.hidden * q.ff_mult, eps=1e-12)
    c = bert_config(q.bert_path)
    return dict(
        hidden=c["hidden_size"],
        depth=c["num_hidden_layers"],
        heads=c["num_attention_heads"],
        intermediate=c["intermediate_size"],
        eps=c.get("layer_norm_eps", 1e-12),
    )


def build_qformer(
    q: QFormerConfig, media_dim: int, lm_dim: int = 0, vocab_size: int = 0, max_frames: int = 8
) -> BertQFormer:
    """A BLIP-2 Q-Former for the config (`vocab_size` > 0: with its text side, for stage 1)."""
    s = qformer_sizes(q)
    return BertQFormer(
        media_dim,
        lm_dim,
        q.num_queries,
        s["depth"],
        s["hidden"],
        s["heads"],
        s["intermediate"],
        q.cross_every,
        max_frames,
        vocab_size,
        q.max_text_len,
        s["eps"],
    )


def bert_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A BERT folder's tensors (model.safetensors, else pytorch_model.bin loaded weights-only), `bert.` prefix
    dropped."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(path / "model.safetensors")
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ConfigError(f"qformer.bert_path={path}: no model.safetensors or pytorch_model.bin inside")
    return {k.removeprefix("bert."): v for k, v in state.items()}


def _bert_names(i: int) -> dict[str, list[str]]:
    """Our parameter names for the BERT layer-i names (one BERT tensor may initialise two of ours)."""
    b, o = f"encoder.layer.{i}.", f"layers.{i}."
    out: dict[str, list[str]] = {}
    for w in ("weight", "bias"):
        for n in ("query", "key", "value"):
            out[b + f"attention.self.{n}.{w}"] = [o + f"attention.{n}.{w}"]
        out[b + f"attention.output.dense.{w}"] = [o + f"attention.dense.{w}"]
        out[b + f"attention.output.LayerNorm.{w}"] = [o + f"attention.norm.{w}"]
        out[b + f"intermediate.dense.{w}"] = [o + f"ffn.dense_in.{w}", o + f"ffn_query.dense_in.{w}"]
        out[b + f"output.dense.{w}"] = [o + f"ffn.dense_out.{w}", o + f"ffn_query.dense_out.{w}"]
        out[b + f"output.LayerNorm.{w}"] = [o + f"ffn.norm.{w}", o + f"ffn_query.norm.{w}"]
    return out


def _copy_rows(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """source's leading rows over target's shape; rows beyond source's (added tokens such as [DEC]) = mean row."""
    out = source.new_empty(target.shape)
    n = min(source.shape[0], target.shape[0])
    out[:n] = source[:n]
    if target.shape[0] > n:
        out[n:] = source.float().mean(0).to(source.dtype)
    return out


@torch.no_grad()
def load_bert_weights(qformer: BertQFormer, path: str | Path, heads: nn.Module | None = None) -> int:
    """Initialise the Q-Former (and the ITG head, where `heads` is given and the folder has `cls.*`) from a
    BERT folder; BERT's token-type-0 embedding is folded into the position embeddings. Returns tensors copied."""
    state = bert_state(path)
    own = dict(qformer.named_parameters())
    plan: dict[str, torch.Tensor] = {}
    if qformer.word_embeddings is not None:
        plan["word_embeddings.weight"] = _copy_rows(
            own["word_embeddings.weight"], state["embeddings.word_embeddings.weight"]
        )
        L = qformer.position_embeddings.num_embeddings
        pos = state["embeddings.position_embeddings.weight"][:L]
        if "embeddings.token_type_embeddings.weight" in state:
            pos = pos + state["embeddings.token_type_embeddings.weight"][0]
        plan["position_embeddings.weight"] = pos
    plan["emb_norm.weight"] = state["embeddings.LayerNorm.weight"]
    plan["emb_norm.bias"] = state["embeddings.LayerNorm.bias"]
    for i in range(len(qformer.layers)):
        for src, dsts in _bert_names(i).items():
            if src not in state:
                raise ConfigError(f"{path}: BERT tensor {src} missing (is qformer.depth larger than the BERT's?)")
            for d in dsts:
                if d in own:
                    plan[d] = state[src]
    targets = own
    if heads is not None and "cls.predictions.transform.dense.weight" in state:
        hp = {f"heads.{k}": v for k, v in heads.named_parameters()}
        targets = {**own, **hp}
        t = "cls.predictions.transform."
        for w in ("weight", "bias"):
            plan[f"heads.lm_transform.0.{w}"] = state[t + f"dense.{w}"]
            plan[f"heads.lm_transform.2.{w}"] = state[t + f"LayerNorm.{w}"]
        plan["heads.lm_bias"] = _copy_rows(hp["heads.lm_bias"], state["cls.predictions.bias"])
    for k, v in plan.items():
        if tuple(v.shape) != tuple(targets[k].shape):
            raise ConfigError(f"{path}: {k} has shape {tuple(v.shape)}, the Q-Former needs {tuple(targets[k].shape)}")
        targets[k].copy_(v.to(targets[k].dtype))
    return len(plan)


@torch.no_grad()
def load_stage1(qformer: BertQFormer, path: str | Path) -> int:
    """Copy stage-1 weights (`qformer.*` in a stage-1 file) into a (query-only) Q-Former; every tensor it has
    except the LM projection `proj` must be in the file with its exact shape."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"qformer.init_from={path}: no such file (the {STAGE1_FILE} written by stage 1)")
    saved = {k.removeprefix("qformer."): v for k, v in load_file(path).items() if k.startswith("qformer.")}
    own = {k: v for k, v in qformer.state_dict(keep_vars=True).items() if not k.startswith("proj.")}
    missing = sorted(set(own) - set(saved))
    if missing:
        raise ConfigError(f"{path} lacks Q-Former tensors {missing[:5]} (a stage-1 file of another size?)")
    for k, t in own.items():
        if tuple(saved[k].shape) != tuple(t.shape):
            raise ConfigError(f"{path}: {k} has shape {tuple(saved[k].shape)}, the model needs {tuple(t.shape)}")
        t.copy_(saved[k].to(t.dtype))
    return len(own)


def init_qformer(model: nn.Module) -> int:
    """A training run's start (stage 2): every BLIP-2 Q-Former resampler of `model` (an LMM) loads the stage-1
    weights `bridge.qformer.init_from`, else the BERT folder `bridge.qformer.bert_path`, where one is set.
    Returns the number of resamplers initialised."""
    q = model.config.bridge.qformer
    if model.config.bridge.kind != "qformer" or q.variant != "blip2" or not (q.init_from or q.bert_path):
        return 0
    n = 0
    for r in model.resamplers.values():
        if isinstance(r, BertQFormer):
            load_stage1(r, q.init_from) if q.init_from else load_bert_weights(r, q.bert_path)
            n += 1
    return n
