"""lmm model on the projector bridge -> HF `LlavaForConditionalGeneration` folder (model, tokenizer, processor),
which transformers (and so vLLM and TGI) load.

    lmm export llava runs/mine/final --out mine-llava-hf

What maps: an HF CLIP / SigLIP tower (lmm `vision.kind: hf`), the 2-layer GELU projector (its frame embedding,
which every image gets, folded into linear_1's bias: W (x + e) + b = W x + (W e + b)), the LM with LoRA merged,
and lmm's marker rows written into the vocabulary (grown where a marker lies beyond it). What does not: open_clip
towers, the flamingo / Q-Former bridges, other projector depths, other encoders (video frames > 1, audio).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmm.config import ConfigError
from lmm.convert.interop import publish

TOWERS = {"clip_vision_model": "CLIPVisionConfig", "siglip_vision_model": "SiglipVisionConfig"}


def check_exportable(model) -> None:
    c = model.config
    if c.bridge.kind != "projector":
        raise ConfigError(f"LLaVA export needs bridge.kind=projector (this model's is {c.bridge.kind!r})")
    if c.bridge.projector.depth != 2 or c.bridge.projector.hidden_mult != 1:
        raise ConfigError("LLaVA export needs the 2-layer projector with hidden_mult=1 (LLaVA's linear_1/linear_2)")
    if c.vision.kind != "hf" or model.vision.model.config.model_type not in TOWERS:
        raise ConfigError("LLaVA export needs an HF CLIP or SigLIP vision tower (vision.kind=hf)")
    if set(model.encoders) != {"image"}:
        raise ConfigError(f"LLaVA export takes image-only models; this one also encodes {sorted(model.encoders)[1:]}")


def llava_model(model):
    """An HF LlavaForConditionalGeneration with this LMM's weights (fp32, CPU)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from lmm.export import merge_lora_

    check_exportable(model)
    if model.config.lora.r > 0:
        merge_lora_(model)
    vision_cfg = model.vision.model.config
    vtype = vision_cfg.model_type
    if vtype == "clip_vision_model":
        strategy = "full" if model.vision.include_cls else "default"
    else:
        strategy = "full"  # no CLS token to drop
    lm = model.lm
    ids = model.embed.new_ids.tolist()
    vocab = max(lm.get_input_embeddings().num_embeddings, max(ids) + 1)
    text_cfg = lm.config.__class__.from_dict(lm.config.to_dict())
    text_cfg.vocab_size = vocab
    cfg = LlavaConfig(
        vision_config=vision_cfg.to_dict(),
        text_config=text_cfg.to_dict(),
        image_token_id=model.image_token_id,
        vision_feature_layer=model.vision.layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        image_seq_length=_tokens_per_image(model),
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    out = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        out.model.vision_tower.load_state_dict(model.vision.model.state_dict())
        emb = lm.get_input_embeddings().weight.detach().float()
        head = lm.get_output_embeddings().weight.detach().float()
        text_state = {k: v.float() for k, v in lm.base_model.state_dict().items()}
        emb_w = lm.get_input_embeddings().weight
        emb_key = next(k for k, v in lm.base_model.named_parameters(remove_duplicate=False) if v is emb_w)
        text_state[emb_key] = _grown(emb, vocab, ids, model.embed.extra)
        out.model.language_model.load_state_dict(text_state)
        out.lm_head.weight.copy_(_grown(head, vocab, ids, model.head.extra))
        mlp = model.resampler.mlp
        e = model.resampler.frame_embs[0].detach().float()
        out.model.multi_modal_projector.linear_1.weight.copy_(mlp[0].weight)
        out.model.multi_modal_projector.linear_1.bias.copy_(mlp[0].bias + mlp[0].weight @ e)
        out.model.multi_modal_projector.linear_2.weight.copy_(mlp[2].weight)
        out.model.multi_modal_projector.linear_2.bias.copy_(mlp[2].bias)
    return out


def _grown(weight: torch.Tensor, vocab: int, ids: list[int], extra: torch.Tensor) -> torch.Tensor:
    """A vocabulary matrix with `vocab` rows whose marker rows are lmm's trained extra rows."""
    out = weight.new_zeros(vocab, weight.shape[1])
    out[: weight.shape[0]] = weight
    if vocab > weight.shape[0]:
        out[weight.shape[0] :] = weight.mean(0)
    out[ids] = extra.detach().float()
    return out


def _tokens_per_image(model) -> int:
    size = model.vision.model.config.image_size
    patch = model.vision.model.config.patch_size
    return (size // patch) ** 2 + int(model.vision.has_cls and model.vision.include_cls)


def processor(model):
    """LlavaProcessor: the model's tokenizer and a CLIP image processor with lmm's preprocessing sizes."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    t = model.vision.preprocess
    size = int(getattr(t, "size", model.vision.model.config.image_size))
    squash = getattr(t, "resize_mode", "shortest") == "squash"
    image_processor = CLIPImageProcessor(
        size={"height": size, "width": size} if squash else {"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=not squash,
        image_mean=list(getattr(t, "mean", (0.48145466, 0.4578275, 0.40821073))),
        image_std=list(getattr(t, "std", (0.26862954, 0.26130258, 0.27577711))),
        resample=3,  # bicubic
    )
    cls = int(model.vision.has_cls)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=model.tokenizer,
        patch_size=model.vision.model.config.patch_size,
        vision_feature_select_strategy=(
            "full" if (model.vision.include_cls or not model.vision.has_cls) else "default"
        ),
        image_token="<image>",
        num_additional_image_tokens=cls,
        chat_template=getattr(model.tokenizer, "chat_template", None),
    )


def export_llava(src: str | Path, out: str | Path) -> Path:
    """Write `src` (an lmm model directory) as an HF LLaVA folder at `out` (whole or not at all)."""
    from lmm.model import LMM

    src = Path(src)
    model = LMM.from_pretrained(src, device="cpu")
    check_exportable(model)
    model.float()
    hf = llava_model(model)
    proc = processor(model)

    def write(tmp: Path) -> None:
        hf.save_pretrained(tmp)
        proc.save_pretrained(tmp)

    return publish(out, write)
