"""Device placement that cannot drift, and hot paths that never wait for the device.

What fails on the first CUDA machine can be seen on the CPU: a model built on the `meta` device must have
every parameter and buffer there (anything left behind was created on the wrong device), and a forward run
with `meta` as the default device must still give CPU results (a tensor made without `device=` would be meta
and fail to mix). Host syncs are counted by the ops that read device values.
"""

import pytest
import torch

from lmm.generation import decode_steps, prepare_inputs
from lmm.model import LMM
from lmm.testing import LM_FAMILIES, HostSyncCounter, tiny_lmm, tiny_lmm_config, tiny_tokenizer

BRIDGES = ("flamingo", "qformer", "projector")


def _off_meta(model):
    return [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type != "meta"]


@pytest.mark.parametrize("bridge", BRIDGES)
@pytest.mark.parametrize("family", LM_FAMILIES)
def test_build_on_meta_places_every_tensor_there(family, bridge):
    model = LMM.from_config(tiny_lmm_config(family, bridge), tokenizer=tiny_tokenizer(), device="meta")
    assert _off_meta(model) == []
    assert model.device.type == "meta"


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_build_on_meta_with_hf_vision_towers(vision):
    model = LMM.from_config(
        tiny_lmm_config("llama", "flamingo", vision=vision), tokenizer=tiny_tokenizer(), device="meta"
    )
    assert _off_meta(model) == []


def test_from_pretrained_on_meta_and_lora(tmp_path):
    cfg = tiny_lmm_config("llama", "flamingo", contrastive_dim=8)
    cfg.lora.r = 4
    LMM.from_config(cfg, tokenizer=tiny_tokenizer(), device="cpu").save_pretrained(tmp_path / "m")
    model = LMM.from_pretrained(tmp_path / "m", device="meta")
    assert _off_meta(model) == []
    assert any("lora_" in n for n, _ in model.named_parameters())


def _batch(model, n_rows=2):
    from PIL import Image

    img = Image.new("RGB", (32, 32), (200, 30, 30))
    prompts = ["<image>a photo of a red circle", "<image>what color<|endofchunk|><image>is the shape?"][:n_rows]
    ims = [[img] * p.count("<image>") for p in prompts]
    return prepare_inputs(model, prompts, ims)


@pytest.mark.parametrize("bridge", BRIDGES)
def test_forward_and_decoding_create_no_tensor_off_the_model_device(bridge):
    model = tiny_lmm("llama", bridge, gates=0.5).eval()
    batch = _batch(model)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.image_token_id, -100)
    with torch.no_grad():
        ref = model(**batch, labels=labels)
        ref_tokens = torch.stack(
            list(decode_steps(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])), 1
        )
        with torch.device("meta"):  # a tensor made without device= now lands on meta and cannot mix with CPU
            out = model(**batch, labels=labels)
            tokens = torch.stack(
                list(decode_steps(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])), 1
            )
    assert out.logits.device.type == "cpu" and tokens.device.type == "cpu"
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss)
    assert torch.equal(tokens, ref_tokens)


def test_frame_mask_follows_the_model():
    model = tiny_lmm("llama", "flamingo").to("meta")
    feats = torch.zeros(1, 1, 2, 5, model.vision.dim, device="meta")
    media = model.encode_media(vision_features=feats, frame_mask=torch.ones(1, 1, 2, dtype=torch.bool))
    assert media.device.type == "meta"


def test_flamingo_forward_and_decode_steps_have_no_host_sync():
    model = tiny_lmm("llama", "flamingo", gates=0.5).eval()
    batch = _batch(model, n_rows=1)  # unpadded: HF's mask builder needs no device value either
    ids = batch["input_ids"].repeat(2, 1)
    labels = ids.masked_fill(ids == model.image_token_id, -100)
    with torch.no_grad():
        media = model.encode_media(batch["pixel_values"].repeat(2, 1, 1, 1, 1, 1))
        with HostSyncCounter() as syncs:
            out = model(ids, media=media, use_cache=True, validate=False)
        assert syncs.count == 0, syncs.ops
        # with labels, only the loss's choice of labelled positions reads back (with a cache, so that HF's mask
        # builder does not look for packed sequences, which reads the device in a no-cache forward)
        with HostSyncCounter() as syncs:
            model(ids, media=media, labels=labels, use_cache=True, validate=False)
        assert syncs.ops == ["nonzero"], syncs.ops
        with HostSyncCounter() as checked:  # the default forward checks the <image> count once
            model(ids, media=media)
        assert checked.count > 0
        # one cached decode step, as decode_steps runs it
        nxt = out.logits[:, -1].argmax(-1)
        pos = torch.full((2, 1), ids.shape[1])
        with HostSyncCounter() as syncs:
            model(
                nxt[:, None],
                media=media,
                position_ids=pos,
                past_key_values=out.past_key_values,
                use_cache=True,
                media_offset=(ids == model.image_token_id).sum(1),
                logits_to_keep=1,
                validate=False,
            )
        assert syncs.count == 0, syncs.ops
        # the whole greedy loop: the prefill's <image> check and a stop check every 8 steps, nothing per step
        with HostSyncCounter() as syncs:
            steps = list(decode_steps(model, ids, torch.ones_like(ids), batch["pixel_values"].repeat(2, 1, 1, 1, 1, 1)))
        assert len(steps) == 32
        assert syncs.count <= 2 + 32 // 8, syncs.ops


def test_flamingo_forward_compiles_to_one_graph():
    model = tiny_lmm("llama", "flamingo", gates=0.5).eval()
    batch = _batch(model, n_rows=1)
    with torch.no_grad():
        media = model.encode_media(batch["pixel_values"])
        explained = torch._dynamo.explain(model)(batch["input_ids"], media=media)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1
