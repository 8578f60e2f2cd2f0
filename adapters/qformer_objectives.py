"""BLIP-2 stage 1: the heads and the three losses that train a `BertQFormer` against the frozen vision tower.

ITC (image-text contrastive, uni-modal mask), ITM (image-text matching on hard negatives, bidirectional mask)
and ITG (image-grounded text generation, multimodal causal mask). Losses are plain functions over tensors;
`stage1_losses` runs the three passes of one batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .qformer import BertQFormer


class Stage1Heads(nn.Module):
    """ITC projections and temperature, the ITM classifier and the ITG language-model head (BERT's
    `cls.predictions`, decoder tied to the Q-Former's word embeddings)."""

    def __init__(self, hidden: int, embed_dim: int, vocab_size: int, eps: float = 1e-12):
        super().__init__()
        self.vision_proj, self.text_proj = nn.Linear(hidden, embed_dim), nn.Linear(hidden, embed_dim)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.itm_head = nn.Linear(hidden, 2)
        self.lm_transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=eps))
        self.lm_bias = nn.Parameter(torch.zeros(vocab_size))

    def temperature(self) -> torch.Tensor:
        return self.temp.clamp(0.001, 0.5)  # BLIP-2's bounds

    def lm_logits(self, h: torch.Tensor, word_embeddings: nn.Embedding) -> torch.Tensor:
        return self.lm_transform(h) @ word_embeddings.weight.t() + self.lm_bias


def itc_similarities(image_feats: torch.Tensor, text_feats: torch.Tensor, temp) -> tuple[torch.Tensor, torch.Tensor]:
    """(sim_i2t, sim_t2i), each (B, B): image_feats (B, Q, E) and text_feats (B, E) unit vectors; a pair's score is
    its best query's cosine / temp."""
    per_query = torch.einsum("iqe,te->itq", image_feats, text_feats)  # (B images, B texts, Q)
    sim = per_query.max(-1).values / temp
    return sim, sim.t()


def itc_loss(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Mean of the two directions' cross-entropies with the diagonal as targets (in-batch negatives)."""
    targets = torch.arange(sim_i2t.shape[0], device=sim_i2t.device)
    return (
        F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
        + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)
    ) / 2


def hard_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    generator: torch.Generator | None = None,
    same: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(negative image per text, negative text per image), each (B,): drawn with probability softmax(similarity)
    over the other rows, so that similar but wrong pairs are drawn most (BLIP-2). `same` (B, B) bool marks
    further pairs that are not negatives (BLIP-2: the same image id; here: the same caption). Needs B >= 2."""
    B = sim_i2t.shape[0]
    if B < 2:
        raise ValueError("hard negatives need a batch of at least 2 pairs")
    eye = torch.eye(B, dtype=torch.bool, device=sim_i2t.device)
    skip = eye if same is None else eye | same

    def weights(sim: torch.Tensor) -> torch.Tensor:
        w = sim.detach().float().softmax(1).clamp_min(1e-30).masked_fill(skip, 0)  # every allowed pair can be drawn
        # a row whose every other pair is `same` draws among those (a wrong label, but never NaN)
        return torch.where(w.sum(1, keepdim=True) == 0, (~eye).float(), w)

    w_t2i, w_i2t = weights(sim_t2i), weights(sim_i2t)
    neg_img = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)
    neg_txt = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)
    return neg_img, neg_txt


def itm_logits(heads: Stage1Heads, query_out: torch.Tensor) -> torch.Tensor:
    """(B, 2) not-matched / matched logits: the ITM head on every query output, averaged over the queries."""
    return heads.itm_head(query_out).mean(1)


def itm_loss(logits: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, matched.long())


def itg_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor, label_smoothing: float = 0.1
) -> torch.Tensor:
    """Next-token cross-entropy of the text under the causal mask: logits (B, L, V) at text positions predict
    the following real token; padding is not a target."""
    target = input_ids[:, 1:].masked_fill(text_mask[:, 1:] == 0, -100)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=-100, label_smoothing=label_smoothing
    )


def stage1_losses(
    qformer: BertQFormer,
    heads: Stage1Heads,
    feats: torch.Tensor,
    input_ids: torch.Tensor,
    text_mask: torch.Tensor,
    dec_token_id: int,
    generator: torch.Generator | None = None,
    label_smoothing: float = 0.1,
) -> dict[str, torch.Tensor]:
    """{"itc", "itm", "itg"} for a batch of matched pairs: feats (B, F, N, Dv) frozen image features; input_ids
    (B, L) starting with [CLS]; for ITG the first token becomes `dec_token_id` ([DEC], as in BLIP-2)."""
    Q = qformer.tokens_per_media
    h = qformer.encode(feats, input_ids, text_mask, "unimodal")
    image_feats = F.normalize(heads.vision_proj(h[:, :Q]), dim=-1)
    text_feats = F.normalize(heads.text_proj(h[:, Q]), dim=-1)  # the [CLS] output
    sim_i2t, sim_t2i = itc_similarities(image_feats, text_feats, heads.temperature())
    itc = itc_loss(sim_i2t, sim_t2i, label_smoothing)

    B = feats.shape[0]
    same_text = (input_ids[:, None] == input_ids[None]).all(-1) & (text_mask[:, None] == text_mask[None]).all(-1)
    neg_img, neg_txt = hard_negatives(sim_i2t, sim_t2i, generator, same_text)
    all_feats = torch.cat([feats, feats[neg_img], feats])  # (pos, text) (neg image, text) (image, neg text)
    all_ids = torch.cat([input_ids, input_ids, input_ids[neg_txt]])
    all_mask = torch.cat([text_mask, text_mask, text_mask[neg_txt]])
    h_itm = qformer.encode(all_feats, all_ids, all_mask, "bidirectional")
    matched = torch.cat([torch.ones(B), torch.zeros(2 * B)]).to(feats.device)
    itm = itm_loss(itm_logits(heads, h_itm[:, :Q]), matched)

    dec_ids = input_ids.clone()
    dec_ids[:, 0] = dec_token_id
    h_itg = qformer.encode(feats, dec_ids, text_mask, "causal")
    itg = itg_loss(heads.lm_logits(h_itg[:, Q:], qformer.word_embeddings), dec_ids, text_mask, label_smoothing)
    return {"itc": itc, "itm": itm, "itg": itg}
