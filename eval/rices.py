"""RICES: Retrieval-based In-Context Example Selection (Yang et al. 2022, as used by Flamingo/OpenFlamingo).

For each query image, the demonstrations are the train images whose vision features are most
similar (cosine similarity of pooled, L2-normalised features from the model's own vision tower).
They are ordered least to most similar, so the closest example sits right before the query.

Train features are computed once and saved to disk (`FeatureCache`); a rerun with the same model
and the same train images loads them instead of running the vision tower again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

EmbedFn = Callable[[list], torch.Tensor]  # list[PIL.Image] -> (N, D)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().float().cpu()
    if x.ndim != 2:
        raise ValueError(f"embed_images must return an (N, D) tensor, got shape {tuple(x.shape)}")
    return torch.nn.functional.normalize(x, dim=-1)


def embed_paths(
    embed: EmbedFn, paths: Sequence[str], batch_size: int = 32, progress: bool = False, desc: str = "RICES features"
) -> torch.Tensor:
    """Features of the images at `paths`, in batches, as an (N, D) L2-normalised float tensor."""
    from .task import load_image

    chunks = []
    starts = range(0, len(paths), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    with torch.no_grad():
        for i in starts:
            chunks.append(_normalize(embed([load_image(p) for p in paths[i : i + batch_size]])))
    if not chunks:
        raise ValueError("no images to embed")
    return torch.cat(chunks)


class FeatureCache:
    """Features of a list of image paths under one model, saved as `<dir>/<name>-<hash>.pt`.

    The file name hashes the model identity and the exact list of paths, so a different model or a
    different image set never reuses a stale file; the file also stores the paths, checked on load.
    """

    def __init__(self, cache_dir: str | os.PathLike, model_id: str):
        self.dir = Path(cache_dir)
        self.model_id = model_id

    def path_for(self, name: str, paths: Sequence[str]) -> Path:
        h = hashlib.sha256(json.dumps([self.model_id, list(paths)]).encode()).hexdigest()[:16]
        return self.dir / f"{name}-{h}.pt"

    def get(
        self, name: str, paths: Sequence[str], embed: EmbedFn, batch_size: int = 32, progress: bool = False
    ) -> torch.Tensor:
        file = self.path_for(name, paths)
        if file.exists():
            saved = torch.load(file, map_location="cpu", weights_only=True)
            if saved.get("paths") == list(paths) and saved.get("model_id") == self.model_id:
                return saved["features"]
        feats = embed_paths(embed, paths, batch_size=batch_size, progress=progress, desc=f"RICES {name}")
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        torch.save({"paths": list(paths), "model_id": self.model_id, "features": feats}, tmp)
        os.replace(tmp, file)
        return feats


class RICES:
    """Nearest train examples by image-feature cosine similarity."""

    def __init__(self, train_features: torch.Tensor):
        self.train = _normalize(train_features)

    @classmethod
    def from_paths(
        cls,
        embed: EmbedFn,
        train_paths: Sequence[str],
        cache: FeatureCache | None = None,
        name: str = "train",
        batch_size: int = 32,
        progress: bool = False,
    ) -> RICES:
        if cache is not None:
            return cls(cache.get(name, train_paths, embed, batch_size=batch_size, progress=progress))
        return cls(embed_paths(embed, train_paths, batch_size=batch_size, progress=progress))

    def find(self, query_features: torch.Tensor, k: int, chunk: int = 256) -> list[list[int]]:
        """Indices of the `k` most similar train items per query, least similar first (closest last).

        Ties are broken by the lower train index, so the choice is deterministic. Queries are
        processed `chunk` at a time, so the similarity matrix never holds all queries at once.
        """
        if k <= 0:
            return [[] for _ in range(len(query_features))]
        if k > len(self.train):
            raise ValueError(
                f"RICES asked for {k} demonstrations but the train split has only {len(self.train)} "
                f"distinct images; lower --shots"
            )
        queries = _normalize(query_features)
        out: list[list[int]] = []
        for i in range(0, len(queries), chunk):
            sims = queries[i : i + chunk] @ self.train.T  # (q, N)
            # A stable sort on -similarity keeps the lower index first among equal similarities.
            order = torch.sort(-sims, dim=-1, stable=True).indices[:, :k]
            out += [list(reversed(row.tolist())) for row in order]
        return out
