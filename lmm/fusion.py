"""The one place that knows a decoder's insides: wrap an HF decoder's layer list from outside.

Chosen layers are replaced by `FusedLayer(block, layer)`: the bridge block runs on the hidden states, then
the original layer, unchanged. Media reach the fused layers as a keyword argument (`lmm_media`) that
transformers 5 decoders hand from the model's forward to every layer; nothing is stored on layers and no
decoder class is edited or patched. New token rows live in a small trainable `ExtendedEmbedding`.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

MEDIA_KWARG = "lmm_media"
# Decoders whose model forward does not hand **kwargs to its layers (MPT) see the media through this variable,
# set for the duration of one LM call by `media_scope` (never an attribute of a layer).
_SCOPED_MEDIA: ContextVar = ContextVar("lmm_scoped_media", default=None)


def kwargs_reach_layers(lm: nn.Module) -> bool:
    """Whether the LM's forward hands extra keyword arguments on to its decoder layers (transformers 5 decoders
    do; MPT's does not). Probed with one token, stopped at the first layer."""
    layers, box = find_layer_list(lm), {}

    def hook(module, args, kwargs):
        box["seen"] = MEDIA_KWARG in kwargs
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    dev = lm.get_input_embeddings().weight.device
    try:
        with torch.no_grad():
            lm.base_model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=dev), **{MEDIA_KWARG: None})
    except _Captured:
        pass
    finally:
        handle.remove()
    return box.get("seen", False)


@contextlib.contextmanager
def media_scope(ctx):
    """Make `ctx` (a MediaContext) visible to the fused layers during one LM call."""
    token = _SCOPED_MEDIA.set(ctx)
    try:
        yield
    finally:
        _SCOPED_MEDIA.reset(token)


@dataclass
class MediaContext:
    """What the cross-attention blocks read in one forward call (an argument, never layer state)."""

    media: torch.Tensor  # (B, M, L, Dv) resampled visual tokens
    visible: torch.Tensor  # bool (B, T, M): which media each of the current T tokens may attend to
    kv_cache: dict | None = None  # per-block media keys/values, kept by the caller across decode steps


class FusedLayer(nn.Module):
    """A bridge block in front of an original decoder layer; attribute lookups fall through to the layer."""

    def __init__(self, block: nn.Module, layer: nn.Module):
        super().__init__()
        self.block = block
        self.layer = layer

    def forward(self, *args, **kwargs):
        ctx: MediaContext | None = kwargs.get(MEDIA_KWARG)
        if ctx is None and not torch.compiler.is_compiling():  # (the scope is never set while compiling)
            ctx = _SCOPED_MEDIA.get()
        if ctx is not None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            p = next(self.block.parameters())
            out = self.block(
                hidden.to(p.dtype) if not torch.is_autocast_enabled() else hidden, ctx.media, ctx.visible, ctx.kv_cache
            ).to(hidden.dtype)
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = out
            else:
                args = (out, *args[1:])
        return self.layer(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)


def find_layer_list(lm: nn.Module) -> nn.ModuleList:
    """The decoder's list of transformer layers, found generically (the ModuleList of num_hidden_layers)."""
    n = getattr(lm.config, "num_hidden_layers", None)
    if n is None:
        n = getattr(lm.config, "n_layer", None)
    candidates = [(name, mod) for name, mod in lm.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) == n]
    if not candidates:
        raise ValueError(
            f"could not find the decoder layer list of {type(lm).__name__} "
            f"(no nn.ModuleList with num_hidden_layers={n} entries)"
        )
    return min(candidates, key=lambda c: c[0].count("."))[1]


def fuse_layers(lm: nn.Module, blocks: dict[int, nn.Module], wrapper: type = FusedLayer) -> nn.ModuleDict:
    """Put `blocks[i]` in front of decoder layer i (in place, as `wrapper(block, layer)`: FusedLayer or a
    subclass); return the blocks as a ModuleDict."""
    layers = find_layer_list(lm)
    for i, block in blocks.items():
        if not 0 <= i < len(layers):
            raise ValueError(f"cross-attention layer index {i} is outside the decoder's {len(layers)} layers")
        if isinstance(layers[i], FusedLayer):
            raise ValueError(f"decoder layer {i} already has a bridge block")
        layers[i] = wrapper(block, layers[i])
    return nn.ModuleDict({str(i): b for i, b in blocks.items()})


def checkpoint_modules(modules) -> int:
    """Activation checkpointing for each module in `modules`: recompute it in backward (non-reentrant
    `torch.utils.checkpoint`) instead of keeping its activations. Wraps each module's forward on the instance
    (names and weights unchanged), so it works for frozen decoder layers kept in eval mode, where transformers'
    own `gradient_checkpointing_enable` does nothing. Returns how many modules were newly wrapped."""
    from torch.utils.checkpoint import checkpoint

    count = 0
    for module in modules:
        if getattr(module, "_lmm_checkpointed", False):
            continue
        inner = module.forward

        def forward(*args, _inner=inner, _fused=isinstance(module, FusedLayer), **kwargs):
            scoped = _fused and MEDIA_KWARG not in kwargs and not torch.compiler.is_compiling()
            if scoped and _SCOPED_MEDIA.get() is not None:
                kwargs[MEDIA_KWARG] = _SCOPED_MEDIA.get()  # the recomputation in backward runs outside the scope
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        module.forward = forward
        module._lmm_checkpointed = True
        count += 1
    return count


def cross_attn_layer_indices(
    num_layers: int, every: int, first_layer: int = 0, layers: list[int] | None = None
) -> list[int]:
    """Indices of the decoder layers that get a gated cross-attention block in front of them."""
    if layers is not None:
        return sorted(set(layers))
    if every < 1:
        raise ValueError(f"bridge.cross_attn.every must be >= 1, got {every}")
    return list(range(first_layer, num_layers, every))


class ExtendedEmbedding(nn.Module):
    """The frozen input embedding plus a small trainable table for the tokens lmm adds.

    Ids in `new_ids` read from the extra table; every other id reads the frozen matrix, which never trains.
    """

    def __init__(self, base: nn.Embedding, new_ids: list[int]):
        super().__init__()
        self.base = base
        self.register_buffer(
            "new_ids", torch.tensor(new_ids, dtype=torch.long, device=base.weight.device), persistent=False
        )
        w = base.weight.detach()
        init = w.float().mean(0, keepdim=True).repeat(len(new_ids), 1)  # mean embedding: a neutral start
        self.extra = nn.Parameter(init + torch.randn_like(init) * w.float().std() * 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids.unsqueeze(-1) == self.new_ids  # (..., K)
        any_new = is_new.any(-1)
        base_ids = torch.where(any_new, torch.zeros_like(ids), ids).clamp(max=self.base.num_embeddings - 1)
        out = self.base(base_ids)
        extra = (is_new.to(self.extra.dtype) @ self.extra).to(out.dtype)  # branch-free: no host sync
        return torch.where(any_new.unsqueeze(-1), extra, out)


class ExtendedHead(nn.Module):
    """The frozen LM head plus trainable output rows for the new tokens (so `<|endofchunk|>` is predictable).

    `scale` and `softcap` repeat what the family's own CausalLM forward does after its lm_head (Cohere's
    logit_scale, Granite's 1 / logits_scaling, Gemma-2/3's tanh soft-capping): lmm computes logits from the
    hidden states itself, so without them those families would not give their own logits.
    """

    def __init__(
        self, base: nn.Module, new_ids: list[int], vocab_out: int, scale: float = 1.0, softcap: float | None = None
    ):
        super().__init__()
        self.base = base
        self.vocab_out = vocab_out
        self.scale, self.softcap = scale, softcap
        self.register_buffer(
            "new_ids", torch.tensor(new_ids, dtype=torch.long, device=base.weight.device), persistent=False
        )
        w = base.weight.detach().float()
        init = w.mean(0, keepdim=True).repeat(len(new_ids), 1)
        self.extra = nn.Parameter(init + torch.randn_like(init) * w.std() * 0.02)
        # the first new id when the new ids are exactly vocab_out - K ... vocab_out - 1, in order, else None
        k = len(new_ids)
        self._appended_from = vocab_out - k if list(new_ids) == list(range(vocab_out - k, vocab_out)) else None
        # ids whose logits are -inf (`language.suppress_tokens`): set by the model after construction
        self.register_buffer(
            "suppressed", torch.zeros(0, dtype=torch.long, device=base.weight.device), persistent=False
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.base(h)
        extra = (h.to(self.extra.dtype) @ self.extra.t()).to(logits.dtype)
        V = logits.shape[-1]
        if self.appended(V):  # the usual case: the new ids follow the frozen vocabulary, in order
            logits = torch.cat([logits, extra], dim=-1)  # one copy; its backward slices, copying nothing
        else:
            if V < self.vocab_out:  # new ids beyond the frozen vocabulary, not in order
                pad = logits.new_full((*logits.shape[:-1], self.vocab_out - V), float("-inf"))
                logits = torch.cat([logits, pad], dim=-1)
            logits = logits.index_copy(-1, self.new_ids, extra)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.suppressed.numel():
            logits = logits.index_fill(-1, self.suppressed, float("-inf"))
        return logits

    def appended(self, base_vocab: int) -> bool:
        """Do the new rows' logits simply follow the base head's `base_vocab` logits?"""
        return self._appended_from == base_vocab


def head_logit_transform(config) -> tuple[float, float | None]:
    """(scale, softcap) that an HF CausalLM family applies to lm_head's output, read from its config."""
    scale = 1.0
    model_type = getattr(config, "model_type", "")
    if "cohere" in model_type and getattr(config, "logit_scale", None) is not None:
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None):
        if "granite" in model_type:  # Granite, GraniteMoE ...: logits / logits_scaling
            scale /= float(config.logits_scaling)
        elif "hyperclovax" in model_type:  # HyperCLOVA X: logits * logits_scaling
            scale *= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma-2 / Gemma-3
    return scale, (float(softcap) if softcap else None)


class _Captured(Exception):
    pass


class DecoderReplay:
    """Run an HF decoder from layer k on saved hidden states (frozen-prefix caching).

    Below the lowest bridge layer a frozen LM's hidden states depend on the text alone, so a trainer may compute
    them once per distinct text and replay only the top layers. The layer arguments (rotary embeddings, mask) and
    the modules that follow the last layer (final norm, projections) are learnt by watching one real forward, so
    nothing about a family is hard-coded; a test checks replay == full forward for every supported family.
    """

    def __init__(self, lm: nn.Module):
        self.lm = lm
        self.layers = find_layer_list(lm)
        self.owner = next(m for m in lm.modules() if any(c is self.layers for c in m.children()))
        self._tail: list[nn.Module] | None = None
        self._kwargs: dict = {}

    def capture(self, layer: int, **forward_kwargs) -> tuple[torch.Tensor, dict]:
        """Hidden states entering decoder layer `layer` and the keyword arguments the decoder gives it."""
        box: dict = {}

        def hook(module, args, kwargs):
            box["h"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            box["kw"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _Captured

        handle = self.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.lm.base_model(**forward_kwargs)
        except _Captured:
            pass
        finally:
            handle.remove()
        return box["h"], box["kw"]

    def tail(self) -> list[nn.Module]:
        """Children of the layer list's owner that run after the last layer (e.g. the final norm)."""
        if self._tail is None:
            order: list[nn.Module] = []
            children = [c for c in self.owner.children() if c is not self.layers]
            hooks = [c.register_forward_hook(lambda m, a, o: order.append(m)) for c in children]
            last = self.layers[len(self.layers) - 1]
            hooks.append(last.register_forward_hook(lambda m, a, o: order.append(last)))
            try:
                with torch.no_grad():
                    dev = self.lm.get_input_embeddings().weight.device
                    self.lm.base_model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=dev))
            finally:
                for h in hooks:
                    h.remove()
            self._tail = order[order.index(last) + 1 :]
        return self._tail

    def layer_kwargs(self, seq_len: int, device: torch.device) -> dict:
        """Arguments for a causal, unpadded (or right-padded) batch of length `seq_len` (broadcast over rows)."""
        key = (seq_len, str(device))
        if key not in self._kwargs:
            with torch.no_grad():
                _, kw = self.capture(
                    0, input_ids=torch.zeros(1, seq_len, dtype=torch.long, device=device), use_cache=False
                )
            kw.pop("past_key_values", None)  # a cache kept here would collect every replay's keys and values
            self._kwargs[key] = kw
        return self._kwargs[key]

    def run(self, hidden: torch.Tensor, start: int, layer_kwargs: dict) -> torch.Tensor:
        for layer in self.layers[start:]:
            out = layer(hidden, **layer_kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        for m in self.tail():
            hidden = m(hidden)
        return hidden
