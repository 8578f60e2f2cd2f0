"""lmm against OpenFlamingo in one process, at the same shapes and seeds: a training step and greedy decoding.

    pip install --no-deps open-flamingo einops einops-exts     # the peer (it pins old versions: no deps)
    python bench/compare_openflamingo.py --shape mid            # CPU (2 threads)
    python bench/compare_openflamingo.py --shape 3b --device cuda

Both models: a random open_clip ViT-B-32 (224 px, 49 patch tokens), a random Llama decoder, a perceiver of
6 x 64 latents (8 heads x 64) and a gated cross-attention block before every decoder layer (8 heads x 64,
FFN x4). OpenFlamingo is built from its own classes (`Flamingo`, `FlamingoLMMixin`) and trains its input
embeddings too, as its factory does by default. Its `generate()` fails on transformers 5 (the mixin's forward
gets no attention_mask), so its decoding runs the way `generate` would: media encoded once (cached-media mode),
then a plain greedy loop over its language model with the KV cache. Runs alternate (lmm, OF, lmm, OF ...);
medians are reported. Prints one JSON line with both sides and the ratios (lmm speed / OpenFlamingo speed):
lmm decodes with its default dynamic KV cache, as `lmm_static` with a preallocated StaticCache and as
`lmm_compiled` with `compile=True` (the decode step torch.compile'd over a static cache; `compile_s` is the first
call, which compiles; the timed calls reuse the graph). `matmul_floor`
is lmm's decode step reduced to its matrix products alone (every weight it reads, on the same rows, nothing
else), and `speedup_bound` OpenFlamingo's time per token over that floor: the ratio lmm would reach if
everything but its matmuls took no time. `prefill_ms` is lmm's media encoding + prompt + first token, and
`end_to_end_bound` OpenFlamingo's whole decode over (that prefill + every later step at the matmul floor): the
most any decode loop doing lmm's arithmetic could reach, since the prefill is mostly the vision encoder and
perceiver both sides run alike. `--dtype bf16` runs both sides' frozen weights in bf16 (CPU autocast; AMX
where the CPU has it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SHAPES = {
    # a smoke test of the script itself (seconds), not a measurement
    "tiny": dict(
        hidden=64, layers=2, heads=2, inter=128, vocab=1000, batch=2, images=2, tokens=32, prompt=15, new_tokens=8
    ),
    # the CPU shape: Llama hidden 512 x 8 layers x 8 heads, intermediate 1376, vocab 32000
    "mid": dict(
        hidden=512, layers=8, heads=8, inter=1376, vocab=32000, batch=4, images=2, tokens=128, prompt=31, new_tokens=32
    ),
    "3b": dict(
        hidden=2048,
        layers=24,
        heads=16,
        inter=5632,
        vocab=50280,
        batch=16,
        images=5,
        tokens=256,
        prompt=31,
        new_tokens=64,
    ),
}


def llama_config(s: dict) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": s["hidden"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["heads"],
        "intermediate_size": s["inter"],
        "vocab_size": s["vocab"],
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    }


def build_lmm(s: dict, device: str, dtype: str):
    from lmm.config import BridgeConfig, CrossAttnConfig, LanguageConfig, LMMConfig, PerceiverConfig, VisionConfig
    from lmm.model import LMM
    from lmm.testing import tiny_tokenizer

    cfg = LMMConfig(
        vision=VisionConfig(name="ViT-B-32", include_cls=False),
        language=LanguageConfig(hf_config=llama_config(s)),
        bridge=BridgeConfig(
            perceiver=PerceiverConfig(num_latents=64, depth=6, heads=8, head_dim=64),
            cross_attn=CrossAttnConfig(every=1, heads=8, head_dim=64, ff_mult=4),
        ),
        dtype=dtype,
    )
    torch.manual_seed(0)
    return LMM.from_config(cfg, tokenizer=tiny_tokenizer(), device=device)


def build_openflamingo(s: dict, device: str, dtype: torch.dtype, media_id: int, eoc_id: int):
    import open_clip
    from open_flamingo.src.flamingo import Flamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32")
    clip.visual.output_tokens = True
    c = dict(llama_config(s))
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(c.pop("model_type"), **c))
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name("model.layers")
    model = Flamingo(
        clip,
        lm,
        eoc_id,
        media_id,
        vis_dim=open_clip.get_model_config("ViT-B-32")["vision_cfg"]["width"],
        cross_attn_every_n_layers=1,
    )
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)  # its factory's default
    model.vision_encoder.to(dtype)
    for _, p in model.lang_encoder.named_parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    return model.to(device)


def batch(s: dict, media_id: int, eoc_id: int, device: str, rows: int, tokens: int, images: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(402, s["vocab"] - 8, (rows, tokens), generator=g)
    chunk = tokens // images
    for k in range(images):
        ids[:, k * chunk] = media_id
        if k:
            ids[:, k * chunk - 1] = eoc_id
    pix = torch.randn(rows, images, 1, 3, 224, 224, generator=g)
    return ids.to(device), torch.ones_like(ids).to(device), pix.to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def matmul_floor(model, rows: int, repeats: int) -> float:
    """Seconds for the matrix products of one lmm decode step and nothing else: each linear layer of the LM and
    of its cross-attention blocks (but the media keys/values, projected once per generation) and the head."""
    import torch.nn.functional as F
    from torch import nn

    once = {id(b.attn.to_kv) for b in model.xattn_blocks()}
    weights = [m.weight for m in model.lm.modules() if isinstance(m, nn.Linear) and id(m) not in once]
    if all(w is not model.head.base.weight for w in weights):
        weights.append(model.head.base.weight)
    xs = {(w.shape[1], w.dtype): torch.randn(rows, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}

    @torch.no_grad()
    def step():
        for w in weights:
            F.linear(xs[w.shape[1], w.dtype], w)

    step()
    return statistics.median(timed(step, str(weights[0].device)) for _ in range(max(3, repeats)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="mid", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the lmm_compiled variant (eager: dynamo's captured graph, no codegen)",
    )
    ap.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="frozen weights of both sides (trainable ones stay fp32): auto = bf16 on CUDA, fp32 on CPU",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    s, dev = SHAPES[args.shape], args.device
    cuda = dev.startswith("cuda")
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and cuda)
    low = torch.bfloat16 if bf16 else torch.float32
    from lmm.generation import GenerationConfig, decode_steps
    from lmm.runtime import enable_tf32
    from lmm.training.config import OptimConfig
    from lmm.training.optim import build_optimizer

    enable_tf32()
    ours = build_lmm(s, dev, "bfloat16" if bf16 else "float32")
    media_id, eoc_id = ours.image_token_id, ours.eoc_token_id
    peer = build_openflamingo(s, dev, low, media_id, eoc_id)
    amp = torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=bf16)
    out = {
        "bench": "compare_openflamingo",
        "shape": args.shape,
        "device": dev,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "threads": args.threads,
        "compile_backend": args.compile_backend,
        "frozen_dtype": str(low).removeprefix("torch."),
        "trainable_params_m": {
            "lmm": sum(p.numel() for p in ours.trainable_parameters()) / 1e6,
            "openflamingo": sum(p.numel() for p in peer.parameters() if p.requires_grad) / 1e6,
        },
    }

    # ---- training step
    if not args.skip_train:
        ids, mask, pix = batch(s, media_id, eoc_id, dev, s["batch"], s["tokens"], s["images"])
        labels = ids.masked_fill(ids == media_id, -100)
        # each side's optimizer as its own trainer builds it: lmm's (fused AdamW), OpenFlamingo's train.py (AdamW)
        opt_ours = build_optimizer(ours, OptimConfig(lr=1e-5), torch.device(dev))
        opt_peer = torch.optim.AdamW([p for p in peer.parameters() if p.requires_grad], lr=1e-5)
        ours.train()
        peer.train()

        def step_ours():
            with amp:
                loss = ours(ids, mask, pixel_values=pix, labels=labels, return_logits=False).loss
            loss.backward()
            opt_ours.step()
            opt_ours.zero_grad(set_to_none=True)

        def step_peer():
            with amp:
                loss = peer(vision_x=pix.to(low), lang_x=ids, attention_mask=mask, labels=labels)[0]
            loss.backward()
            opt_peer.step()
            opt_peer.zero_grad(set_to_none=True)

        step_ours(), step_peer()  # warm-up
        t_ours, t_peer = [], []
        for _ in range(args.repeats):
            t_ours.append(timed(step_ours, dev))
            t_peer.append(timed(step_peer, dev))
        out["train_step_s"] = {"lmm": statistics.median(t_ours), "openflamingo": statistics.median(t_peer)}
        out["train_speedup"] = out["train_step_s"]["openflamingo"] / out["train_step_s"]["lmm"]

    # ---- greedy decoding: 1 image + prompt, new_tokens tokens, batch 1 and 8
    ours.eval()
    peer.eval()
    n_new = s["new_tokens"]
    backend = True if args.compile_backend == "inductor" else args.compile_backend

    @torch.no_grad()
    def decode_ours(ids, mask, pix, cache="dynamic", new_tokens=n_new, compile=False):
        cfg = GenerationConfig(max_new_tokens=new_tokens, stop_at_end_of_chunk=False, cache=cache, compile=compile)
        with amp:
            toks = list(decode_steps(ours, ids, mask, pix, cfg=cfg))
        return torch.stack(toks, 1)

    @torch.no_grad()
    def decode_peer(ids, mask, pix):
        lang = peer.lang_encoder
        with amp:
            peer._encode_vision_x(vision_x=pix.to(low))  # media encoded once, as its generate() does
            lang._use_cached_vision_x = True
            res = lang(input_ids=ids, attention_mask=mask, use_cache=True)
            toks = []
            for _ in range(n_new):
                nxt = res.logits[:, -1].float().argmax(-1, keepdim=True)
                toks.append(nxt)
                mask = torch.cat([mask, torch.ones_like(nxt)], 1)
                res = lang(input_ids=nxt, attention_mask=mask, past_key_values=res.past_key_values, use_cache=True)
            lang._use_cached_vision_x = False
            lang.clear_conditioned_layers()
        return torch.cat(toks, 1)

    for rows in (1, 8):
        ids, mask, pix = batch(s, media_id, eoc_id, dev, rows, s["prompt"] + 1, 1)
        dynamic = decode_ours(ids, mask, pix)  # warm-up
        static = decode_ours(ids, mask, pix, "static")
        t0 = time.perf_counter()
        compiled = decode_ours(ids, mask, pix, compile=backend)  # the first call per batch size compiles
        out[f"decode_b{rows}_compile_s"] = time.perf_counter() - t0
        decode_peer(ids, mask, pix)
        # fp32: every lmm variant must decode the same tokens; bf16 rounds differently over a padded static length
        for name, toks in (("static", static), ("compiled", compiled)):
            if not bf16 and not torch.equal(dynamic, toks):
                raise SystemExit(f"lmm's {name} decoding gave other tokens than its dynamic-cache decoding")
            out[f"decode_b{rows}_{name}_token_agreement"] = (dynamic == toks).float().mean().item()
        n_ours = dynamic.shape[1]
        t_ours, t_static, t_compiled, t_peer = [], [], [], []
        for _ in range(args.repeats):
            t_ours.append(timed(lambda ids=ids, mask=mask, pix=pix: decode_ours(ids, mask, pix), dev))
            t_peer.append(timed(lambda ids=ids, mask=mask, pix=pix: decode_peer(ids, mask, pix), dev))
            t_static.append(timed(lambda ids=ids, mask=mask, pix=pix: decode_ours(ids, mask, pix, "static"), dev))
            t_compiled.append(
                timed(lambda ids=ids, mask=mask, pix=pix: decode_ours(ids, mask, pix, compile=backend), dev)
            )
        tps_ours = rows * n_ours / statistics.median(t_ours)
        tps_static = rows * n_ours / statistics.median(t_static)
        tps_compiled = rows * n_ours / statistics.median(t_compiled)
        tps_peer = rows * n_new / statistics.median(t_peer)
        floor = matmul_floor(ours, rows, args.repeats)
        # media encoding + prefill + the first token (work both sides share, much of it the same vision encoder)
        first = statistics.median(
            timed(lambda ids=ids, mask=mask, pix=pix: decode_ours(ids, mask, pix, new_tokens=1), dev)
            for _ in range(args.repeats)
        )
        out[f"decode_b{rows}_tokens_per_s"] = {
            "lmm": tps_ours,
            "lmm_static": tps_static,
            "lmm_compiled": tps_compiled,
            "openflamingo": tps_peer,
        }
        out[f"decode_b{rows}_speedup"] = tps_ours / tps_peer
        out[f"decode_b{rows}_static_speedup"] = tps_static / tps_peer
        out[f"decode_b{rows}_compiled_speedup"] = tps_compiled / tps_peer
        out[f"decode_b{rows}_matmul_floor_ms"] = floor * 1e3
        out[f"decode_b{rows}_speedup_bound"] = (rows / tps_peer) / floor
        out[f"decode_b{rows}_prefill_ms"] = first * 1e3
        # lmm's prefill as measured and every later step at its matmul floor, against OpenFlamingo's whole decode
        out[f"decode_b{rows}_end_to_end_bound"] = (rows * n_new / tps_peer) / (first + (n_ours - 1) * floor)
    out["torch"] = torch.__version__
    print(json.dumps(out))


if __name__ == "__main__":
    main()
