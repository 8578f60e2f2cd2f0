"""Q-Former bridges: learned queries read the visual tokens and are projected into the LM's embedding space
(placed at the `<image>` positions).

`QFormer` is the simple variant (queries only, pre-norm layers); `BertQFormer` is BLIP-2's, where queries and
text tokens share BERT layers so that stage 1 can train it with ITC / ITM / ITG (see `qformer_objectives`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, feed_forward


class QFormerLayer(nn.Module):
    def __init__(self, dim: int, media_dim: int, heads: int, ff_mult: int, cross: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads=heads, head_dim=dim // heads)
        self.norm2 = nn.LayerNorm(dim) if cross else None
        self.cross_attn = Attention(dim, media_dim, heads=heads, head_dim=dim // heads) if cross else None
        self.ff = feed_forward(dim, ff_mult)

    def forward(self, q: torch.Tensor, media: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.norm1(q)
        q = q + self.self_attn(h, h)
        if self.cross_attn is not None:
            q = q + self.cross_attn(self.norm2(q), media, mask)
        return q + self.ff(q)


class QFormer(nn.Module):
    """(B, M, F, N, Dv) visual tokens -> (B, M, Q, D_lm) query embeddings for the LM."""

    def __init__(
        self,
        media_dim: int,
        lm_dim: int,
        num_queries: int = 32,
        depth: int = 2,
        hidden: int = 256,
        heads: int = 8,
        ff_mult: int = 4,
        cross_every: int = 1,
        max_frames: int = 8,
    ):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"qformer.hidden={hidden} must be divisible by qformer.heads={heads}")
        self.queries = nn.Parameter(torch.randn(num_queries, hidden) * 0.02)
        self.frame_embs = nn.Parameter(torch.zeros(max_frames, media_dim))
        self.media_norm = nn.LayerNorm(media_dim)
        self.layers = nn.ModuleList(
            QFormerLayer(hidden, media_dim, heads, ff_mult, cross=(i % cross_every == 0)) for i in range(depth)
        )
        self.norm = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, lm_dim)

    @property
    def tokens_per_media(self) -> int:
        return self.queries.shape[0]

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, M, F, N, D = x.shape
        x = self.media_norm(x + self.frame_embs[:F].view(1, 1, F, 1, D)).reshape(B * M, F * N, D)
        mask = None
        if frame_mask is not None:
            mask = frame_mask.reshape(B * M, F, 1).expand(B * M, F, N).reshape(B * M, 1, 1, F * N)
        q = self.queries.to(x.dtype).unsqueeze(0).expand(B * M, -1, -1)
        for layer in self.layers:
            q = layer(q, x, mask)
        return self.proj(self.norm(q)).view(B, M, -1, self.proj.out_features)


# --------------------------------------------------------------------------- BLIP-2's Q-Former (BERT layers)

MASK_MODES = ("unimodal", "bidirectional", "causal")


def qformer_mask(num_queries: int, text_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """bool (B, Q + L, Q + L), True = attend, over [queries; text] for BLIP-2's three objectives.

    unimodal (ITC): queries see queries, text sees text, neither sees the other; bidirectional (ITM): everything
    sees everything; causal (ITG): queries see queries, text sees the queries and text up to itself. Padded text
    keys (text_mask 0) are never seen. text_mask: (B, L), 1 for real tokens."""
    if mode not in MASK_MODES:
        raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}")
    B, L = text_mask.shape
    Q, dev = num_queries, text_mask.device
    is_q = torch.arange(Q + L, device=dev) < Q  # (Q + L,)
    valid = torch.cat([torch.ones(B, Q, dtype=torch.bool, device=dev), text_mask.bool()], 1)  # keys that exist
    q_row, q_col = is_q[:, None], is_q[None, :]
    if mode == "unimodal":
        rule = q_row == q_col
    elif mode == "bidirectional":
        rule = torch.ones(Q + L, Q + L, dtype=torch.bool, device=dev)
    else:
        idx = torch.arange(Q + L, device=dev)
        rule = (q_row & q_col) | (~q_row & (q_col | (idx[None, :] <= idx[:, None])))
    return rule[None] & valid[:, None, :]


class BertAttention(nn.Module):
    """BERT's post-norm attention: LayerNorm(x + dense(attention(x -> context)))."""

    def __init__(self, dim: int, context_dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(context_dim, dim), nn.Linear(context_dim, dim)
        self.dense, self.norm = nn.Linear(dim, dim), nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # x: (B, T, dim); context: (B, S, context_dim); mask: bool broadcastable to (B, 1, T, S)
        B, T, D = x.shape
        split = lambda t: t.view(B, t.shape[1], self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(
            split(self.query(x)), split(self.key(context)), split(self.value(context)), attn_mask=mask
        )
        return self.norm(x + self.dense(out.transpose(1, 2).reshape(B, T, D)))


class BertFeedForward(nn.Module):
    """BERT's post-norm MLP: LayerNorm(x + dense_out(gelu(dense_in(x))))."""

    def __init__(self, dim: int, inner: int, eps: float):
        super().__init__()
        self.dense_in, self.dense_out, self.norm = (
            nn.Linear(dim, inner),
            nn.Linear(inner, dim),
            nn.LayerNorm(dim, eps=eps),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dense_out(F.gelu(self.dense_in(x))))


class BertQFormerLayer(nn.Module):
    """Self-attention shared by queries and text; cross-attention to the image for the queries only (where
    `cross`); separate feed-forwards for queries and text (BLIP-2's `intermediate_query`)."""

    def __init__(self, dim: int, media_dim: int, heads: int, inner: int, cross: bool, text: bool, eps: float):
        super().__init__()
        self.attention = BertAttention(dim, dim, heads, eps)
        self.crossattention = BertAttention(dim, media_dim, heads, eps) if cross else None
        self.ffn_query = BertFeedForward(dim, inner, eps)
        self.ffn = BertFeedForward(dim, inner, eps) if text else None

    def forward(self, h: torch.Tensor, Q: int, media: torch.Tensor, media_mask, mask) -> torch.Tensor:
        h = self.attention(h, h, mask)
        q, t = h[:, :Q], h[:, Q:]
        if self.crossattention is not None:
            q = self.crossattention(q, media, media_mask)
        q = self.ffn_query(q)
        if t.shape[1] == 0:
            return q
        return torch.cat([q, self.ffn(t)], 1)


class BertQFormer(nn.Module):
    """BLIP-2's Q-Former: learned queries and (for stage 1) text tokens through BERT layers, cross-attending to
    frozen image features every `cross_every` layers.

    `forward` (stage 2): (B, M, F, N, Dv) visual tokens -> (B, M, Q, lm_dim) soft prompts (queries only, then the
    linear `proj`). `encode` (stage 1): hidden states (B, Q + L, dim) of [queries; text] under one of the masks
    of `qformer_mask`. `vocab_size=0` builds the query path only (what stage 2 keeps)."""

    def __init__(
        self,
        media_dim: int,
        lm_dim: int = 0,
        num_queries: int = 32,
        depth: int = 12,
        hidden: int = 768,
        heads: int = 12,
        intermediate: int = 3072,
        cross_every: int = 2,
        max_frames: int = 8,
        vocab_size: int = 0,
        max_text_len: int = 512,
        eps: float = 1e-12,
    ):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"qformer.hidden={hidden} must be divisible by qformer.heads={heads}")
        if cross_every < 1:
            raise ValueError(f"qformer.cross_every must be >= 1, got {cross_every}")
        text = vocab_size > 0
        self.queries = nn.Parameter(torch.randn(num_queries, hidden) * 0.02)
        self.frame_embs = nn.Parameter(torch.zeros(max_frames, media_dim))
        self.media_norm = nn.LayerNorm(media_dim)  # BLIP-2's ln_vision
        self.word_embeddings = nn.Embedding(vocab_size, hidden) if text else None
        self.position_embeddings = nn.Embedding(max_text_len, hidden) if text else None
        self.emb_norm = nn.LayerNorm(hidden, eps=eps)
        self.layers = nn.ModuleList(
            BertQFormerLayer(hidden, media_dim, heads, intermediate, i % cross_every == 0, text, eps)
            for i in range(depth)
        )
        self.proj = nn.Linear(hidden, lm_dim) if lm_dim else None

    @property
    def tokens_per_media(self) -> int:
        return self.queries.shape[0]

    def media_tokens(self, x: torch.Tensor, frame_mask: torch.Tensor | None = None):
        """(B', F * N, Dv) normed visual tokens and their key mask for (B', F, N, Dv) features."""
        Bp, F_, N, D = x.shape
        x = self.media_norm(x + self.frame_embs[:F_].view(1, F_, 1, D)).reshape(Bp, F_ * N, D)
        mask = None
        if frame_mask is not None:
            mask = frame_mask.reshape(Bp, F_, 1).expand(Bp, F_, N).reshape(Bp, 1, 1, F_ * N).bool()
        return x, mask

    def encode(
        self,
        feats: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        mode: str = "unimodal",
        frame_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, Q + L, dim) of [queries; text] for features (B, F, N, Dv) and text ids (B, L)."""
        media, media_mask = self.media_tokens(feats, frame_mask)
        B, Q = media.shape[0], self.queries.shape[0]
        h = self.queries.to(media.dtype).unsqueeze(0).expand(B, -1, -1)
        mask = None
        if input_ids is not None:
            if self.word_embeddings is None:
                raise ValueError("this Q-Former has no text side (built with vocab_size=0, as for stage 2)")
            L = input_ids.shape[1]
            if L > self.position_embeddings.num_embeddings:
                raise ValueError(
                    f"text of {L} tokens exceeds qformer.max_text_len={self.position_embeddings.num_embeddings}"
                )
            pos = torch.arange(L, device=input_ids.device)
            h = torch.cat([h, self.word_embeddings(input_ids) + self.position_embeddings(pos)], 1)
            text_mask = torch.ones_like(input_ids) if text_mask is None else text_mask
            mask = qformer_mask(Q, text_mask, mode)[:, None]
        h = self.emb_norm(h)
        for layer in self.layers:
            h = layer(h, Q, media, media_mask, mask)
        return h

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, M, F_, N, D = x.shape
        fm = None if frame_mask is None else frame_mask.reshape(B * M, F_)
        q = self.encode(x.reshape(B * M, F_, N, D), frame_mask=fm)
        return self.proj(q).view(B, M, -1, self.proj.out_features)
