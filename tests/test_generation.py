"""Cached decoding equals recomputation; left-padded batches equal single prompts; stops and streaming."""

import pytest
import torch

from lmm.testing import LM_FAMILIES, tiny_lmm


@pytest.fixture(scope="module")
def models():
    return {b: tiny_lmm(family="llama", bridge=b, seed=3, gates=0.8) for b in ("flamingo", "qformer", "projector")}


@pytest.mark.parametrize("bridge", ["flamingo", "qformer", "projector"])
def test_cached_greedy_equals_uncached(models, bridge, images):
    m = models[bridge]
    prompt = "<image>a photo of<|endofchunk|><image>the answer is"
    kw = dict(max_new_tokens=12, stop_at_end_of_chunk=False)
    cached = m.generate(prompt, images=images[:2], use_cache=True, **kw)
    uncached = m.generate(prompt, images=images[:2], use_cache=False, **kw)
    assert cached == uncached


@pytest.mark.parametrize("bridge", ["flamingo", "qformer"])
def test_left_padded_batch_equals_each_prompt_alone(models, bridge, images):
    m = models[bridge]
    prompts = ["<image>a", "two people riding bikes <image> on a street and a dog playing", "<image>x<image>what color"]
    ims = [[images[0]], [images[1]], [images[2], images[3]]]
    batch = m.generate(prompts, images=ims, max_new_tokens=8)
    alone = [m.generate(p, images=i, max_new_tokens=8) for p, i in zip(prompts, ims)]
    assert batch == alone


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_every_family_decodes_with_cache_and_left_padding_exactly(family, images):
    """Each decoder family's own cache (sliding-window layers, soft-capped heads ...) through lmm's decoding."""
    m = tiny_lmm(family=family, seed=3, gates=0.8)
    prompts = ["<image>a photo of<|endofchunk|><image>the answer is", "<image>x"]
    ims = [images[:2], images[2:3]]
    kw = dict(max_new_tokens=10, stop_at_end_of_chunk=False)
    cached = m.generate(prompts, images=ims, use_cache=True, **kw)
    assert cached == m.generate(prompts, images=ims, use_cache=False, **kw)
    assert cached == [m.generate(p, images=i, **kw) for p, i in zip(prompts, ims)]


def test_decoding_uses_the_image(models, images):
    m = models["flamingo"]
    outs = {m.generate("<image>a photo of", images=[im], max_new_tokens=6, stop_at_end_of_chunk=False) for im in images}
    assert len(outs) > 1


def test_stop_at_end_of_chunk(models, images):
    from lmm.generation import GenerationConfig, generate_ids, prepare_inputs

    m = models["flamingo"]
    batch = prepare_inputs(m, ["<image>a photo of"], [[images[0]]])
    first = generate_ids(m, batch, GenerationConfig(max_new_tokens=1))[0][0]
    saved = m.head.extra.detach().clone()
    with torch.no_grad():  # <|endofchunk|>'s output row = 3x the row of the greedy token: it wins
        m.head.extra[1].copy_(3 * m.head.base.weight[first])
    try:
        free = generate_ids(m, batch, GenerationConfig(max_new_tokens=3, stop_at_end_of_chunk=False))[0]
        stopped = generate_ids(m, batch, GenerationConfig(max_new_tokens=3, stop_at_end_of_chunk=True))[0]
    finally:
        with torch.no_grad():
            m.head.extra.copy_(saved)
    assert free[0] == m.eoc_token_id and len(free) == 3
    assert stopped == []


def test_stream_concatenates_to_generate(models, images):
    m = models["projector"]
    whole = m.generate("<image>a photo of", images=[images[1]], max_new_tokens=10)
    assert "".join(m.stream("<image>a photo of", images=[images[1]], max_new_tokens=10)) == whole


def test_sampling_is_deterministic_with_seed_and_beams_run(models, images):
    m = models["flamingo"]
    kw = dict(images=[images[0]], max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, top_k=50)
    a, b = m.generate("<image>a", seed=7, **kw), m.generate("<image>a", seed=7, **kw)
    assert a == b
    greedy = m.generate("<image>a", images=[images[0]], max_new_tokens=6)
    assert m.generate("<image>a", images=[images[0]], max_new_tokens=6, num_beams=1) == greedy
    beam = m.generate(["<image>a", "<image>b c"], images=[[images[0]], [images[1]]], max_new_tokens=6, num_beams=3)
    assert len(beam) == 2


def test_beam_search_finds_higher_likelihood_than_greedy(models, images):
    m = models["flamingo"]
    prompt = "<image>the answer is"
    greedy = m.generate(prompt, images=[images[0]], max_new_tokens=4, stop_at_end_of_chunk=False)
    beam = m.generate(
        prompt, images=[images[0]], max_new_tokens=4, num_beams=4, stop_at_end_of_chunk=False, length_penalty=0.0
    )
    s = m.score([prompt], [[images[0]]], [greedy, beam])
    if greedy and beam:
        assert s[0, 1] >= s[0, 0] - 1e-4


def test_bad_inputs_give_clear_errors(models, images, tmp_path):
    m = models["flamingo"]
    with pytest.raises(ValueError, match="marker"):
        m.generate("no marker here", images=[images[0]])
    with pytest.raises(ValueError, match="not found"):
        m.generate("<image>x", images=[tmp_path / "missing.png"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot decode"):
        m.generate("<image>x", images=[bad])
    with pytest.raises(ValueError, match="context"):
        m.generate("a " * 300, max_new_tokens=5)


def _naive_scores(m, prompts, ims, candidates):
    """Reference: each (prompt, candidate) as one unpadded sequence through a full forward, no cache."""
    from lmm.generation import prepare_inputs

    out = torch.zeros(len(prompts), len(candidates))
    for i, (p, im) in enumerate(zip(prompts, ims)):
        enc = prepare_inputs(m, [p], [im])
        for j, c in enumerate(candidates):
            c_ids = m.tokenizer(c, add_special_tokens=False)["input_ids"]
            ids = torch.cat([enc["input_ids"], torch.tensor([c_ids])], 1)
            lab = torch.full_like(ids, -100)
            lab[0, -len(c_ids) :] = torch.tensor(c_ids)
            with torch.no_grad():
                r = m(ids, pixel_values=enc.get("pixel_values"), labels=lab)
            out[i, j] = -r.token_losses.sum()
    return out


@pytest.mark.parametrize("bridge", ["flamingo", "qformer", "projector"])
def test_prompt_cached_scoring_equals_full_sequences(models, bridge, images):
    """Scoring reuses each prompt's KV cache for all candidates (and left-pads prompts of a batch); it must give
    the log-likelihoods of one plain forward per (prompt, candidate), for one- and multi-token candidates."""
    m = models[bridge]
    prompts = ["<image>the answer is", "two people riding bikes <image> on a street and a dog", "<image>x<image>what"]
    ims = [[images[0]], [images[1]], [images[2], images[3]]]
    candidates = [" yes", " no", " a red triangle on grass", " circle", " teal square"]
    assert max(len(m.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in candidates) > 3
    ref = _naive_scores(m, prompts, ims, candidates)
    for bs in (1, 2, 16):  # one prompt per forward, a padded pair, everything in one forward
        torch.testing.assert_close(m.score(prompts, ims, candidates, batch_size=bs), ref, atol=2e-4, rtol=1e-4)


def test_media_keys_values_are_projected_once_per_generation(images):
    """Cached decoding projects each block's media keys/values at the prefill only; the tokens equal the
    recomputing path's."""
    from lmm.generation import GenerationConfig, decode_steps, prepare_inputs
    from lmm.testing import tiny_lmm

    model = tiny_lmm(gates=0.7, seed=2).eval()
    calls = []
    hooks = [blk.attn.to_kv.register_forward_hook(lambda *a: calls.append(1)) for blk in model.xattn_blocks()]
    batch = prepare_inputs(
        model, ["<image>a photo of<image>two", "<image>what color is"], [[images[0], images[1]], [images[2]]]
    )
    runs = {}
    for use_cache in (True, False):
        calls.clear()
        cfg = GenerationConfig(max_new_tokens=10, stop_at_end_of_chunk=False, use_cache=use_cache)
        runs[use_cache] = (
            torch.stack(
                list(decode_steps(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], cfg=cfg)),
                1,
            ),
            len(calls),
        )
    for h in hooks:
        h.remove()
    n_blocks = len(model.xattn_blocks())
    assert torch.equal(runs[True][0], runs[False][0])
    assert runs[True][1] == n_blocks  # once, at the prefill
    assert runs[False][1] == n_blocks * 10  # the reference path recomputes them every step
