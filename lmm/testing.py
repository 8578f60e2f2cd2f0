"""Tiny random-weight building blocks for tests and CPU benchmarks (nothing is downloaded).

A real byte-level BPE tokenizer trained in milliseconds on a built-in corpus, and tiny configs
for each supported LM family and vision family.
"""

from __future__ import annotations

import copy

_CORPUS = [
    "a photo of a red circle",
    "a photo of a blue square",
    "what shape is in the image?",
    "what color is the shape?",
    "the answer is yes",
    "the answer is no",
    "an image of a cat",
    "a dog playing in the park",
    "two people riding bikes on a street",
    "Question: Answer:",
    "circle rectangle triangle green red gray teal black yellow brown blue yes no",
    "Output: The capital of France is Paris.",
    "user assistant system",
] * 4


def tiny_tokenizer(vocab_size: int = 400):
    """A real `PreTrainedTokenizerFast` (byte-level BPE) with BOS/EOS/PAD and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lmm.data.byte_tokenizer import chatml_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return chatml_tokenizer(tok)


LM_FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "gpt_neox", "opt", "phi", "gemma", "gemma2", "cohere", "granite")


def tiny_lm_config(
    family: str = "llama",
    vocab_size: int = 512,
    hidden: int = 32,
    layers: int = 4,
    heads: int = 4,
    max_positions: int = 256,
):
    """A tiny `PretrainedConfig` of the given HF decoder family (random weights when built)."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size)
    if family in ("llama", "qwen2", "mistral"):
        kw = dict(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
        )
    elif family == "gpt2":
        kw = dict(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256)
    elif family == "gpt_neox":
        kw = dict(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=max_positions,
        )
    elif family == "opt":
        kw = dict(
            hidden_size=hidden,
            ffn_dim=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=max_positions,
            word_embed_proj_dim=hidden,
        )
    elif family == "phi":
        kw = dict(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=max_positions,
        )
    elif family in ("gemma", "gemma2", "cohere", "granite"):
        # families whose forward rescales the embeddings (Gemma) or the LM head's logits (Gemma-2 soft-capping,
        # Cohere logit_scale, Granite logits_scaling), set strong enough here that skipping it fails the tests
        kw = dict(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=max_positions,
        )
        kw.update(
            {
                "gemma": dict(head_dim=hidden // heads),
                "cohere": dict(logit_scale=0.25),
                "gemma2": dict(head_dim=hidden // heads, final_logit_softcapping=0.5, attn_logit_softcapping=None),
                "granite": dict(
                    logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2
                ),
            }[family]
        )
    else:
        raise ValueError(f"unknown tiny LM family {family!r}; choose one of {LM_FAMILIES}")
    return AutoConfig.for_model(family, **common, **kw, bos_token_id=0, eos_token_id=0, pad_token_id=0)


TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}


def tiny_vision_config(kind: str = "open_clip"):
    """A tiny random vision tower config: open_clip ViT, HF CLIP or HF SigLIP (32 px images)."""
    from lmm.config import VisionConfig

    if kind == "open_clip":
        return VisionConfig(kind="open_clip", name="lmm-tiny-vit", model_cfg=TINY_VIT)
    hf = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}
    if kind not in hf:
        raise ValueError(f"unknown tiny vision kind {kind!r}: open_clip, clip or siglip")
    return VisionConfig(
        kind="hf",
        hf_config={
            "model_type": hf[kind],
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
    )


def tiny_audio_config(pool: int = 4, max_chunks: int = 8):
    """An EncoderConfig of a tiny random Whisper encoder (80 mel bins, 30 s windows -> 1500 / pool tokens of 16)."""
    from lmm.config import EncoderConfig

    hf = {"d_model": 16, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 32, "num_mel_bins": 80}
    return EncoderConfig(kind="whisper", options={"hf_config": hf, "pool": pool, "max_chunks": max_chunks})


def tiny_lmm_config(
    family: str = "llama",
    bridge: str = "flamingo",
    vision: str = "open_clip",
    cross_attn_layers: list[int] | None = None,
    max_positions: int = 256,
    **bridge_kw,
):
    """An LMMConfig of tiny random parts (a few hundred thousand parameters), fp32."""
    from lmm.config import BridgeConfig, CrossAttnConfig, LanguageConfig, LMMConfig, PerceiverConfig, QFormerConfig

    lm = tiny_lm_config(family, max_positions=max_positions).to_dict()
    keep = {
        k: v
        for k, v in lm.items()
        if not k.startswith("_") and k not in ("transformers_version", "architectures", "dtype", "torch_dtype")
    }
    bridge_cfg = BridgeConfig(
        kind=bridge,
        perceiver=PerceiverConfig(num_latents=4, depth=1, heads=2, head_dim=8, max_media=8),
        cross_attn=CrossAttnConfig(every=2, heads=2, head_dim=8, layers=cross_attn_layers),
        qformer=QFormerConfig(num_queries=4, depth=2, hidden=16, heads=2),
        **bridge_kw,
    )
    return LMMConfig(
        vision=tiny_vision_config(vision),
        language=LanguageConfig(hf_config=keep),
        bridge=bridge_cfg,
        dtype="fp32",
        name=f"tiny-{family}-{bridge}",
    )


def tiny_lmm(
    family: str = "llama",
    bridge: str = "flamingo",
    vision: str = "open_clip",
    seed: int = 0,
    gates: float | None = None,
    cross_attn_layers: list[int] | None = None,
    max_positions: int = 256,
    **bridge_kw,
):
    """A tiny random LMM on CPU with the tiny tokenizer. `gates` sets every tanh gate (default 0: exact bare LM)."""
    import torch

    from lmm.model import LMM

    torch.manual_seed(seed)
    cfg = tiny_lmm_config(family, bridge, vision, cross_attn_layers, max_positions, **bridge_kw)
    model = LMM.from_config(cfg, tokenizer=tiny_tokenizer(), device="cpu")
    if gates is not None:
        with torch.no_grad():
            for blk in model.xattn_blocks():
                blk.attn_gate.fill_(gates)
                blk.ff_gate.fill_(gates)
    return model


def reference_greedy(out, mask, step, max_new_tokens: int, stop, never) -> list[list[int]]:
    """Another framework's greedy loop, as its own generate runs it, for parity tests: `out` is the prefill's output,
    `step(next_ids (B, 1), mask (B, T+1), out) -> out` one cached step; `never` columns (lmm never emits media
    markers) are out of the argmax; each row ends at (and excludes) its first token in `stop`."""
    import torch

    rows: list[list[int]] = [[] for _ in range(mask.shape[0])]
    done = [False] * mask.shape[0]
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        logits[:, never] = float("-inf")
        nxt = logits.argmax(-1, keepdim=True)
        for b, t in enumerate(nxt[:, 0].tolist()):
            if not done[b]:
                done[b] = t in stop
                if not done[b]:
                    rows[b].append(t)
        if all(done):
            break
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        out = step(nxt, mask, out)
    return rows


def sine_wave(freq: float, seconds: float = 1.0, rate: int = 16000, amplitude: float = 0.3):
    """A pure tone as float32 samples (n,): a clip with a known spectrum for audio tests."""
    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def tiny_media_lmm(seed: int = 5, gates: float = 1.0, video_frames: int = 4, pool: int = 50, max_chunks: int = 2):
    """A tiny flamingo LMM with a tiny random Whisper audio encoder (1500 / pool tokens per 30 s chunk) beside the
    image tower, every tanh gate at `gates`, `video_frames` frames per video: for video/audio inference tests."""
    import torch

    from lmm.model import LMM

    torch.manual_seed(seed)
    cfg = tiny_lmm_config()
    cfg.encoders = {"audio": tiny_audio_config(pool=pool, max_chunks=max_chunks)}
    cfg.video_frames = video_frames
    model = LMM.from_config(cfg, tokenizer=tiny_tokenizer(), device="cpu")
    with torch.no_grad():
        for blk in model.xattn_blocks():
            blk.attn_gate.fill_(gates)
            blk.ff_gate.fill_(gates)
    return model.eval()


def saved_tiny_chat_model(folder, image_name: str = "image.png"):
    """(model, model dir, image path): a tiny flamingo LMM with open gates saved to `folder`/model and a 32x32
    noise PNG beside it, which the chat and web front-end tests open as a user would."""
    import numpy as np
    from PIL import Image

    # a long context (RoPE: no position table to grow), so a test can stream an answer long enough to interrupt
    model = tiny_lmm(family="llama", bridge="flamingo", gates=1.0, seed=5, max_positions=8192)
    model.save_pretrained(folder / "model")
    image = folder / image_name
    Image.fromarray(np.random.RandomState(1).randint(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    return model, folder / "model", image


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class running_server:
    """`with running_server(cmd, url, log) as proc:` starts `cmd` (output to `log`), waits until GET `url`
    succeeds, and stops the process on exit; a process that dies or never answers raises with its log."""

    def __init__(self, cmd: list[str], url: str, log, headers: dict | None = None, timeout: float = 180):
        self.cmd, self.url, self.log, self.headers, self.timeout = cmd, url, log, headers, timeout

    def __enter__(self):
        import subprocess
        import time

        import httpx

        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.cmd[:2]} exited with {self.proc.returncode}:\n{open(self.log).read()}")
            try:
                if httpx.get(self.url, headers=self.headers, timeout=2).is_success:
                    return self.proc
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"{self.url} did not answer within {self.timeout} s:\n{open(self.log).read()}")
            time.sleep(0.5)

    def __exit__(self, *exc):
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return False


def stream_chat(http, base_url: str, body: dict, headers: dict | None = None) -> tuple[int, str]:
    """POST `body` as a streamed chat completion to `base_url` ("" for a TestClient) with an httpx-style client:
    (status, the answer's text joined from its SSE deltas; the error body's text when the status is not 200)."""
    import json

    url = base_url + "/v1/chat/completions"
    with http.stream("POST", url, headers=headers or {}, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.text
        text = ""
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        return 200, text


class ListSource:
    """A resumable batch source over a fixed list of batch dicts (what the demo's feature cache is like)."""

    def __init__(self, batches, task_names=None, loss_weights=None):
        self.items, self.pos = batches, 0
        if task_names:
            self.task_names = task_names
        if loss_weights:
            self.loss_weights = loss_weights

    def __iter__(self):
        while self.pos < len(self.items):
            self.pos += 1
            yield copy.deepcopy(self.items[self.pos - 1])

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def tiny_train_config(tmp_path, **kw):
    """A 4-step constant-lr TrainConfig writing under tmp_path, no logging side files; `kw` merges into it."""
    from lmm.training import TrainConfig

    d = {
        "name": "t",
        "run_dir": str(tmp_path / "run"),
        "seed": 0,
        "optim": {"lr": 5e-3, "gate_lr_mult": 10.0},
        "schedule": {"max_steps": 4, "warmup_steps": 0, "kind": "constant"},
        "checkpoint": {"every": 0, "at_end": False},
        "logging": {"tensorboard": False, "progress": False, "plot": False},
    }
    for k, v in kw.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return TrainConfig.from_dict(d)


class CountingBackend:
    """A torch.compile backend that runs the captured graph as is (no codegen) and counts the graphs it was given:
    how many times a compiled function compiled."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


class HostSyncCounter:
    """Counts the operations that make the host wait for a tensor's values (`.item()`, `bool(t)`, `int(t)`,
    `.tolist()`, `nonzero`, boolean indexing, `masked_select`): on a GPU each is a device sync. Works on the CPU,
    where the same operations run, so a CPU test proves a code path sync-free before it meets a GPU.

        with HostSyncCounter() as syncs:
            model(ids, mask, media=media, validate=False)
        assert syncs.count == 0, syncs.ops
    """

    SYNC_OPS = (
        "_local_scalar_dense",
        "nonzero",
        "masked_select",
        "unique",
        "_unique2",
        "repeat_interleave",
        "equal",
        "is_nonzero",
    )

    def __enter__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.__name__.split(".")[0]
                if name in HostSyncCounter.SYNC_OPS:
                    # repeat_interleave syncs only when the output size is unknown (a tensor of repeats)
                    if (
                        name != "repeat_interleave"
                        or (kwargs or {}).get("output_size") is None
                        and any(isinstance(a, torch.Tensor) for a in args[1:2])
                    ):
                        counter.ops.append(name)
                return func(*args, **(kwargs or {}))

        self.ops: list[str] = []
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        return False

    @property
    def count(self) -> int:
        return len(self.ops)


def saved_activation_bytes(model, step) -> int:
    """Bytes of the tensors autograd saves for backward during `step()` (a forward that returns a loss),
    parameters excluded: what activation checkpointing is meant to cut. Runs the backward too."""
    import torch

    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return total


# Coloured discs and their captions: the image-text pairs of the contrastive and matching tests.
DISC_COLOURS = {
    "red": (230, 20, 20),
    "green": (20, 200, 40),
    "blue": (30, 40, 230),
    "yellow": (240, 230, 20),
    "white": (250, 250, 250),
    "black": (5, 5, 5),
    "purple": (140, 20, 200),
    "orange": (250, 140, 0),
}
DISC_CAPTIONS = [f"a {c} disc" for c in DISC_COLOURS]
DISC_BOXES = ([4, 4, 28, 28], [2, 10, 20, 28], [10, 2, 28, 20], [7, 7, 25, 25])


def disc_pictures(style: int = 0):
    """One 32 px disc per DISC_COLOURS entry on grey, drawn in box DISC_BOXES[style] (a small shift per colour)."""
    from PIL import Image, ImageDraw

    out = []
    for i, rgb in enumerate(DISC_COLOURS.values()):
        im = Image.new("RGB", (32, 32), (128, 128, 128))
        x0, y0, x1, y1 = DISC_BOXES[style]
        ImageDraw.Draw(im).ellipse([x0, y0 + i % 3, x1, y1 - i % 2], fill=rgb)
        out.append(im)
    return out


def pair_batch(model, images, captions) -> dict:
    """Pair rows "<image>caption<|endofchunk|>" with labels on the caption, as the data pipeline makes them."""
    from lmm.data.formats import MediaRef
    from lmm.data.packing import Encoded, collate
    from lmm.data.text import encode_document

    enc = [encode_document([MediaRef(None), c], model.tokenizer) for c in captions]
    batch = collate([Encoded(e.input_ids, e.labels) for e in enc], model.tokenizer.pad_token_id)
    batch.pop("pixel_values"), batch.pop("task_ids")
    return {**batch, "pixel_values": model.pixel_values(images)[:, None, None]}


def sibling_module(test_file: str, name: str):
    """The module `name`.py beside `test_file`, imported once per process (pytest's importlib mode puts no test
    folder on sys.path): shared test helpers such as tests/convert/openflamingo_oracle.py."""
    import importlib.util
    import sys
    from pathlib import Path

    key = f"lmm_tests_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(test_file).with_name(f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]
