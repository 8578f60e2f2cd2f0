"""Choosing what comes next: weighted mixtures, curriculum stages, and 4M-style repeat sampling.

All randomness is counter-based (a fresh generator from (seed, reader, draw number)), so a
resumed stream needs only the draw counter to make the same choices again.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def draw_rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


class Mixture:
    """Picks a dataset index with probability proportional to its weight, among those still active."""

    def __init__(self, weights: list[float], seed: int = 0, reader: int = 0):
        self.weights = np.asarray(weights, dtype=np.float64)
        self.active = np.ones(len(weights), dtype=bool)
        self.seed, self.reader = seed, reader

    def choose(self, draw: int) -> int | None:
        """The dataset for draw number `draw`, or None when every dataset is exhausted."""
        w = np.where(self.active, self.weights, 0.0)
        if w.sum() <= 0:
            return None
        u = draw_rng(self.seed, self.reader, draw, 31337).random()
        return int(min(np.searchsorted(np.cumsum(w) / w.sum(), u, side="right"), len(w) - 1))

    def exhaust(self, index: int) -> None:
        self.active[index] = False


class Schedule:
    """Curriculum: stage i runs for steps[i] steps (None: until its data ends); maps a step to its stage."""

    def __init__(self, steps: list[int | None]):
        self.steps = steps
        self.bounds = np.cumsum([s if s is not None else np.inf for s in steps])

    def stage_at(self, step: int) -> int | None:
        """The stage index that batch number `step` (0-based, per rank) belongs to; None after the last."""
        i = int(np.searchsorted(self.bounds, step, side="right"))
        return i if i < len(self.steps) else None


class RepeatBuffer:
    """4M's repeat sampling: keep up to `size` decoded samples, serve each up to `repeat` times.

    Decoding (video, large images) is the expensive part; the cheap steps after it (augmenting
    transform, tokenisation) run again at every use, so repeats still differ. Items are picked at
    random from the buffer; an item leaves after its last use and the buffer refills from `fetch`.
    """

    def __init__(self, fetch: Callable[[], object], size: int, repeat: int, seed: int = 0, reader: int = 0):
        if size < 1 or repeat < 1:
            raise ValueError(f"repeat buffer needs size >= 1 and repeat >= 1, got {size}, {repeat}")
        self.fetch, self.size, self.repeat = fetch, size, repeat
        self.seed, self.reader, self.draws = seed, reader, 0
        self.items: list[list] = []  # [item, uses left]
        self.upstream_done = False

    def next(self):
        """The next item to use, or None once upstream and buffer are both empty."""
        while not self.upstream_done and len(self.items) < self.size:
            item = self.fetch()
            if item is None:
                self.upstream_done = True
            else:
                self.items.append([item, self.repeat])
        if not self.items:
            return None
        i = int(draw_rng(self.seed, self.reader, self.draws, 4242).integers(len(self.items)))
        self.draws += 1
        entry = self.items[i]
        entry[1] -= 1
        if entry[1] == 0:
            self.items.pop(i)
        return entry[0]
