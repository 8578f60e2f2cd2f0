"""Losses over the model's outputs, kept out of the forward's arithmetic (HF LLaVA's `loss_function` style)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmm.adapters import info_nce

# Rows of (positions x vocabulary) logits materialised at once: 2048 x 50k x (bf16 + fp32 + fp32 grad) = 1 GB,
# freed per chunk.
LOSS_CHUNK = 2048


def _chunk_losses(head: Callable, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), target, ignore_index=-100, reduction="none")


def next_token_losses(
    head: Callable, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = LOSS_CHUNK, sparse: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over labelled targets, per-token losses (B, T-1) with 0 where labels[:, 1:] == -100).

    `sparse` (default: unless compiling) runs the head on labelled positions only: instruction data labels a few
    answer tokens per row, and full-vocabulary logits for every position would cost more than the rest of a
    bridge step. Finding those positions reads the labels on the host (one sync); `sparse=False` runs the head
    everywhere instead, with no sync and one graph for `torch.compile`. The head runs in chunks of `chunk`
    positions, each recomputed in backward, so full-vocabulary logits for the whole batch never exist at once."""
    target = labels[:, 1:].to(hidden.device)
    h = hidden[:, :-1]
    B, T1, D = h.shape
    flat_h, flat_t = h.reshape(B * T1, D), target.reshape(B * T1)
    if sparse is None:
        sparse = not torch.compiler.is_compiling()
    idx = (flat_t != -100).nonzero().squeeze(1) if sparse else None  # labelled positions (host sync)
    if idx is not None:
        flat_h, flat_t = flat_h[idx], flat_t[idx]
    n_rows = flat_h.shape[0]
    pieces = []
    for s in range(0, n_rows, chunk):
        hs, ts = flat_h[s : s + chunk], flat_t[s : s + chunk]
        if torch.is_grad_enabled() and hs.requires_grad and n_rows > chunk:
            pieces.append(checkpoint(_chunk_losses, head, hs, ts, use_reentrant=False))
        else:
            pieces.append(_chunk_losses(head, hs, ts))
    losses = torch.cat(pieces) if pieces else h.new_zeros(0, dtype=torch.float32)
    if idx is not None:
        losses = torch.zeros(B * T1, dtype=losses.dtype, device=losses.device).index_put((idx,), losses)
    per_token = losses.view(B, T1)
    n = (target != -100).sum().clamp(min=1)
    return per_token.sum() / n, per_token


class _GatherRows(torch.autograd.Function):
    """all_gather of equal-sized row blocks whose backward sums every rank's gradient for this rank's block (an
    all-reduce, then this rank's slice): backend-agnostic (gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None, None


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(rows of `x` from every rank in rank order, where this rank's rows start, world size). Gradients flow back
    to each rank's own rows, summed over the ranks that used them. Ranks may hold different row counts (padded
    for the gather: one host sync). One process: x itself."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0, 1
    world, rank = dist.get_world_size(), dist.get_rank()
    counts = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(sizes, counts)
    sizes = [int(s) for s in sizes]
    pad = max(sizes)
    padded = torch.cat([x, x.new_zeros(pad - x.shape[0], *x.shape[1:])]) if x.shape[0] < pad else x
    full = _GatherRows.apply(padded, rank, world)  # (world * pad, ...)
    return torch.cat([full[r * pad : r * pad + n] for r, n in enumerate(sizes)]), sum(sizes[:rank]), world


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, gather: bool = False):
    """Symmetric InfoNCE of matching (image[i], text[i]) unit vectors; the other rows are the negatives.

    `gather`: the negatives are every rank's rows (CLIP, FLAVA: 8 ranks x 32 rows = 256 candidates each). Each
    rank scores its own rows against all candidates and returns its share x world size, so the MEAN over ranks
    (what DDP/FSDP average) is the InfoNCE of the whole global batch, and so are the averaged gradients.
    Every rank must call it (a collective), also one with no rows. Fewer than two rows in all: 0."""
    if not gather:
        return info_nce(image, text, scale)
    all_image, start, world = gather_rows(image)
    all_text, _, _ = gather_rows(text)
    n, total = image.shape[0], all_image.shape[0]
    if total < 2:
        return (0 * (image.sum() + text.sum() + scale.sum())).float()
    target = torch.arange(start, start + n, device=image.device)
    i2t = F.cross_entropy((scale * image @ all_text.t()).float(), target, reduction="sum")
    t2i = F.cross_entropy((scale * text @ all_image.t()).float(), target, reduction="sum")
    return (i2t + t2i) / 2 * world / total


def itm_candidates(n_media: torch.Tensor, duplicates: torch.Tensor | None = None) -> torch.Tensor:
    """bool (n, n): may row j's media (or text) be row i's negative? Another row (never the pair itself) with as
    many media items, so that a swapped text has a media item for each of its markers, and not one of the
    `duplicates` (bool (n, n): rows with the same text or the same media, whose swap would still match)."""
    n = n_media.shape[0]
    ok = (n_media[:, None] == n_media[None, :]) & ~torch.eye(n, dtype=torch.bool, device=n_media.device)
    return ok if duplicates is None else ok & ~duplicates


def sample_negatives(sim: torch.Tensor | None, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP-2's hard-negative mining for image-text matching: (a negative text for each image (n,), a negative
    image for each text (n,)), drawn with probability softmax(sim) over the `allowed` candidates (bool (n, n),
    never the pair itself); uniformly where `sim` (image x text logits) is None. -1 where a row has no candidate."""
    n = allowed.shape[0]
    logits = allowed.new_zeros(n, n, dtype=torch.float32) if sim is None else sim.detach().float()

    def draw(scores: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        has = ok.any(1)
        weights = scores.masked_fill(~ok, float("-inf")).softmax(-1)
        weights = torch.where(has[:, None], weights, torch.ones_like(weights))  # rows without a candidate
        return torch.where(has, torch.multinomial(weights, 1).squeeze(1), -1)

    return draw(logits, allowed), draw(logits.t(), allowed.t())


def itm_loss(logits: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
    """Image-text matching: cross-entropy of (N, 2) [not matched, matched] logits against bool targets (N,)."""
    return F.cross_entropy(logits.float(), matched.long())
