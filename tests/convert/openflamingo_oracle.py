"""OpenFlamingo 2.0.1's own classes as the oracle for the converter tests: a tiny random `Flamingo` built the way
its factory builds one (tokenizer additions, resized embeddings, FlamingoLMMixin), saved as OpenFlamingo saves
(`torch.save(model.state_dict())`), and its forward / greedy decoding as its `generate` runs them.

OpenFlamingo's `generate()` itself fails on transformers 5 (its mixin's forward gets no attention_mask from HF's
generation loop), so `of_greedy` is the loop `generate` amounts to: media encoded once (cached-media mode), KV
cache, position ids from the attention mask as HF's generation computes them for left-padded batches.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from lmm.testing import TINY_VIT, reference_greedy, tiny_lm_config, tiny_tokenizer

# the tests that need OpenFlamingo's own classes: `pytestmark = OF.NEEDS_OPENFLAMINGO`
NEEDS_OPENFLAMINGO = pytest.mark.skipif(
    importlib.util.find_spec("open_flamingo") is None or importlib.util.find_spec("einops_exts") is None,
    reason="needs open-flamingo (pip install --no-deps open-flamingo einops einops-exts)",
)
LAYERS_ATTR = {"llama": "model.layers", "gpt_neox": "gpt_neox.layers", "mpt": "transformer.blocks"}


def lm_config(family: str):
    from transformers import AutoConfig

    if family == "mpt":  # transformers' MptForCausalLM (OpenFlamingo-3B/9B's MPT decoders)
        return AutoConfig.for_model(
            "mpt", d_model=64, n_heads=4, n_layers=4, expansion_ratio=2, max_seq_len=256, vocab_size=512
        )
    return tiny_lm_config(family, hidden=64, layers=4, heads=4)


def build(tmp, family: str = "llama", every: int = 2, seed: int = 0, pad_token: bool = False):
    """(OpenFlamingo model, its tokenizer, paths): paths has checkpoint, lm (HF folder), vision (spec string)."""
    import open_clip
    from open_flamingo.src.flamingo import Flamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance
    from transformers import AutoModelForCausalLM

    from lmm.backbones.vision import register_open_clip_config

    register_open_clip_config("lmm-tiny-vit", TINY_VIT)
    torch.manual_seed(seed)
    clip = open_clip.create_model("lmm-tiny-vit")
    with torch.no_grad():  # a non-trivial final LayerNorm, so skipping it (or the CLS token) shows
        clip.visual.ln_post.weight.uniform_(0.5, 1.5)
        clip.visual.ln_post.bias.normal_(0, 0.5)
    (tmp / "vit.json").write_text(json.dumps(TINY_VIT))
    torch.save(clip.state_dict(), tmp / "vit.pt")
    clip.visual.output_tokens = True

    lm = AutoModelForCausalLM.from_config(lm_config(family))
    tok = tiny_tokenizer()
    if not pad_token:  # like LLaMA's and GPT-NeoX's tokenizers: OpenFlamingo then adds <PAD>
        tok.pad_token = None
    lm.save_pretrained(tmp / "lm")
    tok.save_pretrained(tmp / "lm")

    # create_model_and_transforms, minus the downloads
    tok.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<PAD>"})
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name(LAYERS_ATTR[family])
    lm.resize_token_embeddings(len(tok))
    eoc, media = tok.encode("<|endofchunk|>")[-1], tok.encode("<image>")[-1]
    model = Flamingo(clip, lm, eoc, media, vis_dim=TINY_VIT["vision_cfg"]["width"], cross_attn_every_n_layers=every)
    # "trained": every perceiver / cross-attention tensor and the whole embedding matrix moved off its init
    # (gates open, norms not 1/0), so a wrong mapping cannot hide behind a default
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("perceiver.") or "gated_cross_attn_layer" in name:
                if name.endswith("_gate"):
                    p.uniform_(-1.0, 1.0, generator=g)
                else:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        model.lang_encoder.get_input_embeddings().weight.add_(
            torch.randn(model.lang_encoder.get_input_embeddings().weight.shape, generator=g) * 0.05
        )
    model.eval()
    torch.save(model.state_dict(), tmp / "checkpoint.pt")
    paths = {
        "checkpoint": tmp / "checkpoint.pt",
        "lm": tmp / "lm",
        "vision": f"{tmp / 'vit.json'}:{tmp / 'vit.pt'}",
    }
    return model, tok, paths


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def of_logits(model, ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Flamingo.forward, with the position ids HF's generation gives a left-padded batch."""
    model._encode_vision_x(vision_x=pixels)
    model._condition_media_locations(input_ids=ids)
    out = model.lang_encoder(input_ids=ids, attention_mask=mask, position_ids=_positions(mask))
    model.lang_encoder.clear_conditioned_layers()
    return out.logits


@torch.no_grad()
def of_greedy(model, ids, mask, pixels, max_new_tokens: int, stop_ids: set[int], never: list[int]) -> list[list[int]]:
    """Greedy decoding as OpenFlamingo's generate runs it; `never` columns (lmm never emits media markers) are
    excluded from the argmax. Rows end at (and exclude) their first stop token."""
    lang = model.lang_encoder
    model._encode_vision_x(vision_x=pixels)
    lang._use_cached_vision_x = True
    try:
        res = lang(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True)
        return reference_greedy(
            res,
            mask,
            lambda nxt, m, res: lang(
                input_ids=nxt,
                attention_mask=m,
                position_ids=m.long().sum(-1, keepdim=True) - 1,
                past_key_values=res.past_key_values,
                use_cache=True,
            ),
            max_new_tokens,
            stop_ids,
            never,
        )
    finally:
        lang._use_cached_vision_x = False
        lang.clear_conditioned_layers()
