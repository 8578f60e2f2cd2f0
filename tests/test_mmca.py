"""Multimodal causal attention (DeepSpeed-VisualChat): the attention rules entry by entry, the bare LM's text
at zero init for every decoder family, cached == uncached decoding, and a toy run whose answer follows the image."""

import pytest
import torch

from lmm.bridges.mmca import lm_attention_mask, text_to_image_visible
from lmm.testing import LM_FAMILIES, tiny_lmm
from tests.test_fusion import bare_copy, old_vocab

# pad, text, image 0 (2 tokens), text, text, image 1 (2 tokens), text
KIND = torch.tensor([[-2, -1, 0, 0, -1, -1, 1, 1, -1]])


def test_lm_attention_mask_entry_by_entry():
    """Text -> earlier text only (causal); image token -> its own image's tokens; padding -> itself."""
    want = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0, 0],  # pad
            [0, 1, 0, 0, 0, 0, 0, 0, 0],  # t1
            [0, 0, 1, 1, 0, 0, 0, 0, 0],  # image 0
            [0, 0, 1, 1, 0, 0, 0, 0, 0],  # image 0
            [0, 1, 0, 0, 1, 0, 0, 0, 0],  # t2
            [0, 1, 0, 0, 1, 1, 0, 0, 0],  # t3
            [0, 0, 0, 0, 0, 0, 1, 1, 0],  # image 1
            [0, 0, 0, 0, 0, 0, 1, 1, 0],  # image 1
            [0, 1, 0, 0, 1, 1, 0, 0, 1],  # t4
        ],
        dtype=torch.bool,
    )
    assert torch.equal(lm_attention_mask(KIND, torch.zeros(1, 0))[0], want)
    # with two cached keys (text, then an image token: 0 in the mask handed back): text queries see the text one
    got = lm_attention_mask(KIND, torch.tensor([[1, 0]]))[0]
    assert torch.equal(got[:, 2:], want)
    assert torch.equal(got[:, 0], KIND[0] == -1) and not got[:, 1].any()


def test_text_to_image_visibility_entry_by_entry():
    """Text -> every token of every earlier image; image and padding queries read nothing."""
    want = torch.zeros(9, 9, dtype=torch.bool)
    want[4, 2:4] = want[5, 2:4] = True  # t2, t3 see image 0
    want[8, 2:4] = want[8, 6:8] = True  # t4 sees images 0 and 1
    assert torch.equal(text_to_image_visible(KIND, None)[0], want)
    kept = torch.tensor([[0, 1, 1]])  # a decode step: the prompt's image keys stay visible, nothing new
    step = torch.tensor([[-1]])
    assert torch.equal(text_to_image_visible(step, kept, fresh=False)[0], torch.tensor([[False, True, True]]))


def open_gates(model, value):
    with torch.no_grad():
        for blk in model.xattn_blocks():
            blk.attn_gate.fill_(value)


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_zero_init_text_equals_bare_lm_with_images_in_the_sequence(family, images):
    model = tiny_lmm(family=family, bridge="mmca", seed=1).eval()
    bare = bare_copy(model, family)
    prompt = "<image>a photo of a red circle<|endofchunk|><image>a blue"
    enc = model.tokenizer([prompt], return_tensors="pt")
    pix = torch.stack([model.image_processor(im) for im in images[:2]])[None, :, None]
    text_ids = enc.input_ids[:, enc.input_ids[0] != model.image_token_id]  # the text alone
    with torch.no_grad():
        out = model(enc.input_ids, enc.attention_mask, pixel_values=pix)
        want = bare(inputs_embeds=model.embed(text_ids)).logits
        text_only = model(text_ids).logits
        open_gates(model, 1.0)
        opened = model(enc.input_ids, enc.attention_mask, pixel_values=pix)
        other = model(enc.input_ids, enc.attention_mask, pixel_values=pix.flip(1))
    is_text = out.attention_mask[0].bool()  # 0 at the spliced image tokens
    assert int((~is_text).sum()) == 2 * 17  # two images of 17 projected tokens (16 patches + CLS)
    old = old_vocab(model, want.shape[-1])
    got = out.logits[:, is_text]
    assert got.shape[1] == text_ids.shape[1]
    torch.testing.assert_close(got[..., old], want[..., old], atol=1e-5, rtol=0)
    torch.testing.assert_close(text_only[..., old], want[..., old], atol=1e-5, rtol=0)
    assert not torch.allclose(opened.logits[:, is_text], got, atol=1e-4)  # the images reach the text once open
    assert not torch.allclose(opened.logits[:, is_text], other.logits[:, is_text], atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_cached_decoding_equals_uncached_and_left_padding(family, images):
    model = tiny_lmm(family=family, bridge="mmca", seed=3).eval()
    open_gates(model, 0.8)
    prompts = ["<image>a photo of<|endofchunk|><image>the answer is", "<image>x"]
    ims = [images[:2], images[2:3]]
    kw = dict(max_new_tokens=10, stop_at_end_of_chunk=False)
    cached = model.generate(prompts, images=ims, use_cache=True, **kw)
    assert cached == model.generate(prompts, images=ims, use_cache=False, **kw)
    assert cached == [model.generate(p, images=i, **kw) for p, i in zip(prompts, ims)]


def test_toy_run_answer_depends_on_the_image(images):
    """Two images, two answers: after a few hundred steps on the bridge alone, greedy decoding follows the image."""
    torch.manual_seed(0)
    model = tiny_lmm(bridge="mmca", seed=4)
    with torch.no_grad():  # a random tiny LM's head spans logits of +-0.6 only: sharpen it so one token can win
        model.head.base.weight.mul_(30)
    tok = model.tokenizer
    answers = [" yes", " no"]
    prompt = "<image>the answer is"
    p_ids = tok(prompt, add_special_tokens=False).input_ids
    rows, labels = [], []
    for a in answers:
        a_ids = tok(a, add_special_tokens=False).input_ids
        rows.append(p_ids + a_ids)
        labels.append([-100] * len(p_ids) + a_ids)
    ids, lab = torch.tensor(rows), torch.tensor(labels)
    assert ids.shape[1] == len(p_ids) + 1  # one answer token each
    pix = torch.stack([model.image_processor(im) for im in images[:2]])[:, None, None]
    before = {model.generate(prompt, images=[im], max_new_tokens=1, stop_at_end_of_chunk=False) for im in images[:2]}
    assert len(before) == 1  # gates at 0: the image cannot change the answer
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        loss = model(ids, pixel_values=pix, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert loss.item() < 0.05
    got = [model.generate(prompt, images=[im], max_new_tokens=1, stop_at_end_of_chunk=False) for im in images[:2]]
    assert got == answers


def test_prompt_cached_scoring_equals_full_sequences(images):
    """`score` continues every candidate from the prompt's cache and the text-to-image keys kept in media_kv."""
    from tests.test_generation import _naive_scores

    model = tiny_lmm(bridge="mmca", seed=3).eval()
    open_gates(model, 0.8)
    prompts = ["<image>the answer is", "two people riding bikes <image> on a street and a dog", "<image>x<image>what"]
    ims = [[images[0]], [images[1]], [images[2], images[3]]]
    candidates = [" yes", " a red triangle on grass", " teal square"]
    ref = _naive_scores(model, prompts, ims, candidates)
    for bs in (1, 16):
        torch.testing.assert_close(model.score(prompts, ims, candidates, batch_size=bs), ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["mmca", "blip2-qformer"])
def test_builds_on_meta_and_makes_no_tensor_off_the_model_device(variant, images):
    """Every tensor of a model built on `meta` lands there; a forward with `meta` as the default device still
    gives the CPU result (no tensor is made without device=)."""
    from lmm.config import QFormerConfig
    from lmm.model import LMM
    from lmm.testing import tiny_lmm_config, tiny_tokenizer

    cfg = tiny_lmm_config("llama", "mmca" if variant == "mmca" else "qformer")
    if variant != "mmca":
        cfg.bridge.qformer = QFormerConfig(variant="blip2", num_queries=4, depth=2, hidden=16, heads=2)
    meta = LMM.from_config(cfg, tokenizer=tiny_tokenizer(), device="meta")
    assert [n for n, t in list(meta.named_parameters()) + list(meta.named_buffers()) if t.device.type != "meta"] == []
    torch.manual_seed(0)
    model = LMM.from_config(cfg, tokenizer=tiny_tokenizer(), device="cpu").eval()
    open_gates(model, 0.5)
    enc = model.tokenizer(["<image>a photo of a red circle"], return_tensors="pt")
    pix = model.image_processor(images[0])[None, None, None]
    with torch.no_grad():
        ref = model(enc.input_ids, enc.attention_mask, pixel_values=pix).logits
        with torch.device("meta"):
            got = model(enc.input_ids, enc.attention_mask, pixel_values=pix).logits
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("variant", ["mmca", "blip2-qformer"])
def test_save_and_load_give_the_same_logits(variant, images, tmp_path):
    from lmm.config import QFormerConfig
    from lmm.model import LMM

    if variant == "mmca":
        model = tiny_lmm(bridge="mmca", seed=5).eval()
        open_gates(model, 0.7)
    else:
        from lmm.testing import tiny_lmm_config, tiny_tokenizer

        cfg = tiny_lmm_config("llama", "qformer")
        cfg.bridge.qformer = QFormerConfig(variant="blip2", num_queries=4, depth=2, hidden=16, heads=2, cross_every=2)
        model = LMM.from_config(cfg, tokenizer=tiny_tokenizer(), device="cpu").eval()
    model.save_pretrained(tmp_path / "m")
    loaded = LMM.from_pretrained(tmp_path / "m", device="cpu").eval()
    enc = model.tokenizer(["<image>a photo of a red circle"], return_tensors="pt")
    pix = model.image_processor(images[0])[None, None, None]
    with torch.no_grad():
        want = model(enc.input_ids, enc.attention_mask, pixel_values=pix).logits
        got = loaded(enc.input_ids, enc.attention_mask, pixel_values=pix).logits
    torch.testing.assert_close(got, want)
