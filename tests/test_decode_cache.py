"""A static KV cache (transformers' StaticCache, preallocated, written in place) decodes exactly as the dynamic one."""

import pytest
import torch

from lmm.generation import GenerationConfig, decode_steps, prepare_inputs
from lmm.testing import LM_FAMILIES, CountingBackend, HostSyncCounter, tiny_lmm

PROMPTS = ["<image>a photo of<|endofchunk|><image>the answer is", "<image>x"]


def _tokens(model, batch, **kw) -> torch.Tensor:
    cfg = GenerationConfig(max_new_tokens=10, stop_at_end_of_chunk=False, **kw)
    return torch.stack(
        list(decode_steps(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], cfg=cfg)), 1
    )


def _lm_caches(model) -> tuple[list, object]:
    """Records the type of the cache every LM call receives."""
    seen: list = []
    hook = model.lm.base_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(type(kwargs.get("past_key_values")).__name__), with_kwargs=True
    )
    return seen, hook


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_static_cache_decodes_like_dynamic_for_every_family(family, images):
    """Left-padded rows, two images in one row, each family's own layers (sliding windows, soft-capped heads)."""
    m = tiny_lmm(family=family, seed=3, gates=0.8).eval()
    batch = prepare_inputs(m, PROMPTS, [images[:2], images[2:3]])
    assert not bool(batch["attention_mask"].all())  # the batch is padded
    seen, hook = _lm_caches(m)
    static = _tokens(m, batch, cache="static")
    hook.remove()
    # the prefill and the 9 steps after it ran on the static cache, none on a dynamic one
    assert seen.count("StaticCache") == 10 and "DynamicCache" not in seen, seen
    assert torch.equal(static, _tokens(m, batch, cache="dynamic"))
    one = {k: v[:1] for k, v in batch.items()}  # one unpadded row: positions instead of a mask
    assert bool(one["attention_mask"].all())
    assert torch.equal(_tokens(m, one, cache="static"), _tokens(m, one, cache="dynamic"))


@pytest.mark.parametrize("bridge", ["qformer", "projector"])
def test_static_cache_with_media_spliced_into_the_sequence(bridge, images):
    """Early fusion turns each marker into K positions: the static cache has room for them."""
    m = tiny_lmm(family="llama", bridge=bridge, seed=3, gates=0.8).eval()
    batch = prepare_inputs(m, PROMPTS, [images[:2], images[2:3]])
    assert torch.equal(_tokens(m, batch, cache="static"), _tokens(m, batch, cache="dynamic"))


def test_static_cache_sampling_and_beams_equal_dynamic(images):
    m = tiny_lmm(family="llama", seed=3, gates=0.8).eval()
    ims = [[images[0]], [images[1], images[2]]]
    prompts = ["<image>a", "<image>b c<image>d"]
    kw = dict(images=ims, max_new_tokens=8, stop_at_end_of_chunk=False)
    sample = dict(do_sample=True, temperature=1.5, top_p=0.9, top_k=50, seed=7)
    assert m.generate(prompts, cache="static", **sample, **kw) == m.generate(prompts, **sample, **kw)
    assert m.generate(prompts, cache="static", num_beams=3, **kw) == m.generate(prompts, num_beams=3, **kw)


def test_static_cache_decode_loop_has_no_per_step_host_sync(images):
    m = tiny_lmm("llama", "flamingo", gates=0.5).eval()
    batch = prepare_inputs(m, ["<image>a photo of"], [[images[0]]])
    ids = batch["input_ids"].repeat(2, 1)
    pix = batch["pixel_values"].repeat(2, 1, 1, 1, 1, 1)
    cfg = GenerationConfig(max_new_tokens=32, stop_at_end_of_chunk=False, cache="static")
    with HostSyncCounter() as syncs:
        steps = list(decode_steps(m, ids, torch.ones_like(ids), pix, cfg=cfg))
    assert len(steps) == 32
    assert syncs.count <= 2 + 32 // 8, syncs.ops  # the prefill's checks and a stop check every 8 steps


def test_unknown_cache_kind_names_the_choices(images):
    m = tiny_lmm(family="llama", seed=3).eval()
    with pytest.raises(ValueError, match="dynamic, static"):
        m.generate("<image>a", images=[images[0]], cache="paged")


def test_mmca_refuses_the_static_cache_by_name(images):
    """MMCA builds its LM mask over exactly the cached keys: a static cache is refused, not silently wrong."""
    m = tiny_lmm(family="llama", bridge="mmca", seed=3).eval()
    with pytest.raises(ValueError, match="mmca bridge decodes with cache='dynamic'"):
        m.generate("<image>a", images=[images[0]], cache="static")


def test_compiled_step_decodes_like_eager_with_one_graph_per_batch_size(images):
    """compile=<backend>: left-padded rows with two images, and a seeded sampler, give the eager tokens; the mask
    grows every step and prompts differ in length, yet one graph serves every step of a batch size."""
    m = tiny_lmm(family="llama", seed=3, gates=0.8).eval()
    backend = CountingBackend()
    batch = prepare_inputs(m, PROMPTS, [images[:2], images[2:3]])
    assert torch.equal(_tokens(m, batch, compile=backend), _tokens(m, batch))
    assert backend.graphs == 1
    longer = prepare_inputs(m, [p + " and then some more words" for p in PROMPTS], [images[:2], images[2:3]])
    assert longer["input_ids"].shape[1] > batch["input_ids"].shape[1]
    sample = dict(do_sample=True, temperature=1.5, top_p=0.9, seed=7)
    assert torch.equal(_tokens(m, longer, compile=backend, **sample), _tokens(m, longer, **sample))
    assert backend.graphs == 1  # same batch size and cache bucket: no new graph
    one = {k: v[:1] for k, v in batch.items()}  # unpadded: positions, no mask
    assert torch.equal(_tokens(m, one, compile=backend), _tokens(m, one))
    with pytest.raises(ValueError, match="num_beams=1"):
        m.generate(PROMPTS[0], images=images[:2], num_beams=2, compile=backend)


def test_inductor_compiled_step_decodes_like_eager(images):
    """compile=True: inductor's generated kernels (this CPU's C++), not only the captured graph."""
    m = tiny_lmm(family="llama", seed=3, gates=0.8).eval()
    batch = prepare_inputs(m, PROMPTS, [images[:2], images[2:3]])
    assert torch.equal(_tokens(m, batch, compile=True), _tokens(m, batch))


def test_a_model_decoded_compiled_is_freed_with_its_last_reference(images):
    """The compiled step lives with its model: dropping the model frees it (and its weights), graph and all."""
    import gc
    import weakref

    m = tiny_lmm(family="llama", seed=3, gates=0.8).eval()
    m.generate("<image>a photo of", images=[images[0]], max_new_tokens=3, compile=CountingBackend())
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None
