"""Batches whose frozen computations are done once: vision features per distinct image and the LM's hidden
states below the lowest cross-attention layer per distinct text.

For a fixed set of (image, conversation) samples with a flamingo bridge, nothing below the first bridge layer
depends on the image, and the vision tower is frozen, so a training step only needs the top layers. This is
what lets the embedded easy-vqa demo train on a 2-core CPU in minutes. Batches hold `vision_features` and
`prefix_hidden` in place of `pixel_values`, and go straight into `LMM.forward`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from lmm.chat import with_system_prompt
from lmm.config import ConfigError
from lmm.data.text import encode_conversation


@dataclass
class ConversationSample:
    image: str  # path of the one image (referenced by the `<image>` marker in `messages`)
    messages: list[dict]  # role/content messages, content strings with `<image>` markers


class CachedConversationBatches:
    """Seeded, resumable epochs over samples, with frozen features precomputed (see the module docstring)."""

    def __init__(self, model, samples: list[ConversationSample], batch_size: int, seed: int = 0,
                 feature_batch: int = 64, progress=None, balance_answers: bool = False):
        self.model, self.batch_size, self.seed = model, batch_size, seed
        self.weights = answer_balanced_weights(samples) if balance_answers else None
        tok = model.tokenizer
        seq_index: dict[tuple, int] = {}
        seqs, img_index, images = [], {}, []
        self.rows = []  # (sequence index, image index) per sample
        encoded: dict[str, tuple] = {}  # rendering a chat template is slow: once per distinct conversation
        for s in samples:
            text_key = repr(s.messages)
            if text_key not in encoded:
                enc = encode_conversation(with_system_prompt(s.messages, model.config.system_prompt), tok)
                encoded[text_key] = (tuple(enc.input_ids), tuple(enc.labels))
            key = encoded[text_key]
            if key not in seq_index:
                seq_index[key] = len(seqs)
                seqs.append(key)
            if s.image not in img_index:
                img_index[s.image] = len(images)
                images.append(s.image)
            self.rows.append((seq_index[key], img_index[s.image]))
        T = max(len(ids) for ids, _ in seqs)
        pad = tok.pad_token_id
        self.input_ids = torch.tensor([list(ids) + [pad] * (T - len(ids)) for ids, _ in seqs])
        self.attention_mask = torch.tensor([[1] * len(ids) + [0] * (T - len(ids)) for ids, _ in seqs])
        self.labels = torch.tensor([list(lab) + [-100] * (T - len(lab)) for _, lab in seqs])
        self.prefix_layer = model.lowest_bridge_layer()
        with torch.no_grad():
            self.prefix_hidden = torch.cat([
                model.prefix_hidden_states(self.input_ids[i:i + feature_batch], self.attention_mask[i:i + feature_batch])
                for i in range(0, len(seqs), feature_batch)]).cpu()
            self.vision_features = self._encode_images(images, feature_batch, progress)
        self.num_sequences, self.num_images = len(seqs), len(images)
        self.epoch, self.position = 0, 0

    def _encode_images(self, paths: list[str], batch: int, progress) -> torch.Tensor:
        feats = []
        for i in range(0, len(paths), batch):
            pix = self.model.pixel_values(paths[i:i + batch])
            feats.append(self.model.vision(pix.to(self.model.device)).cpu())
            if progress is not None:
                progress(min(i + batch, len(paths)), len(paths))
        return torch.cat(feats)  # (num_images, N, Dv)

    def __len__(self) -> int:
        return (len(self.rows) + self.batch_size - 1) // self.batch_size

    def _order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        if self.weights is None:
            return rng.permutation(len(self.rows))
        return rng.choice(len(self.rows), size=len(self.rows), p=self.weights)  # with replacement

    def __iter__(self):
        while True:
            order = self._order(self.epoch)
            while self.position < len(order):
                idx = order[self.position:self.position + self.batch_size]
                self.position += len(idx)
                yield self._batch(idx)
            self.epoch, self.position = self.epoch + 1, 0

    def _batch(self, idx: np.ndarray) -> dict:
        seq = torch.tensor([self.rows[i][0] for i in idx])
        img = torch.tensor([self.rows[i][1] for i in idx])
        mask = self.attention_mask[seq]
        T = int(mask.sum(1).max())  # trim the common right padding
        return {"input_ids": self.input_ids[seq, :T], "attention_mask": mask[:, :T], "labels": self.labels[seq, :T],
                "prefix_hidden": self.prefix_hidden[seq, :T], "prefix_layer": self.prefix_layer,
                "vision_features": self.vision_features[img][:, None, None]}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "balance_answers": self.weights is not None}

    def load_state_dict(self, state: dict) -> None:
        fresh = "; resume with the run's own setting, or start fresh with checkpoint.resume=null"
        if state.get("seed") != self.seed:
            raise ConfigError(f"the checkpoint's data order was made with seed {state.get('seed')}, this run uses "
                              f"seed {self.seed}{fresh}")
        saved_balance = state.get("balance_answers", False)
        if saved_balance != (self.weights is not None):
            raise ConfigError(f"the checkpoint's data order was made with balance_answers={saved_balance}, this "
                              f"run uses balance_answers={self.weights is not None}{fresh}")
        self.epoch, self.position = state["epoch"], state["position"]


def answer_balanced_weights(samples: list[ConversationSample]) -> np.ndarray:
    """Sampling probabilities that make every answer of a prompt equally likely, keeping each prompt's share.

    A prompt is everything before the final assistant turn; its answer is that turn. Where a question's answers
    are skewed ("is there a red shape?" is "no" 7 times in 8 on easy-vqa), a model can score well from the text
    alone and never learns to look; balancing removes that prior (the idea behind VQA v2's balanced pairs)."""
    keys = [(repr(s.messages[:-1]), s.messages[-1]["content"]) for s in samples]
    per_answer = Counter(keys)  # (prompt, answer) -> samples
    per_prompt = Counter(q for q, _ in keys)  # prompt -> samples
    answers_of = Counter(q for q, _ in per_answer)  # prompt -> distinct answers
    w = np.array([per_prompt[q] / (answers_of[q] * per_answer[(q, a)]) for q, a in keys])
    return w / w.sum()
