"""RICES retrieves the true nearest train images, and caches their features on disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lmm.eval.rices import RICES, FeatureCache, embed_paths


def mean_rgb(images) -> torch.Tensor:
    """A plain image embedding: the mean colour, as a vector."""
    return torch.tensor(np.stack([np.asarray(im, dtype=np.float32).reshape(-1, 3).mean(0) for im in images]))


# Train colours whose cosine similarity to the query (250, 5, 0) falls strictly in this order:
TRAIN_COLORS = [(0, 0, 255), (120, 135, 0), (255, 0, 0), (0, 255, 0), (200, 55, 0), (0, 120, 130)]
QUERY = (250, 5, 0)
EXPECTED_TOP3 = [1, 4, 2]  # least to most similar: (120,135,0), (200,55,0), (255,0,0)


def _write(tmp_path, colors, prefix):
    paths = []
    for i, c in enumerate(colors):
        p = tmp_path / f"{prefix}{i}.png"
        Image.new("RGB", (16, 16), c).save(p)
        paths.append(str(p))
    return paths


def test_rices_picks_the_known_nearest_neighbours_closest_last(tmp_path):
    train = _write(tmp_path, TRAIN_COLORS, "train")
    query = _write(tmp_path, [QUERY, (0, 10, 250)], "query")
    rices = RICES.from_paths(mean_rgb, train)
    found = rices.find(embed_paths(mean_rgb, query), k=3)
    assert found[0] == EXPECTED_TOP3
    assert found[1][-1] == 0  # the blue query's closest train image is the blue one


def test_equal_similarities_break_ties_by_train_order(tmp_path):
    train = _write(tmp_path, [(10, 10, 10), (0, 255, 0), (20, 20, 20), (30, 30, 30)], "t")
    rices = RICES.from_paths(mean_rgb, train)
    # grey query: the three greys are equally similar (cosine 1); the lower index ranks higher (closer to the end)
    order = rices.find(mean_rgb([Image.new("RGB", (4, 4), (5, 5, 5))]), k=3)[0]
    assert order == [3, 2, 0]


def test_features_are_cached_on_disk_and_reused(tmp_path):
    train = _write(tmp_path, TRAIN_COLORS, "train")
    calls = []

    def counting_embed(images):
        calls.append(len(images))
        return mean_rgb(images)

    cache = FeatureCache(tmp_path / "cache", model_id="m1")
    first = cache.get("train", train, counting_embed, batch_size=4)
    assert calls == [4, 2] and cache.path_for("train", train).is_file()
    again = FeatureCache(tmp_path / "cache", model_id="m1").get("train", train, counting_embed)
    assert calls == [4, 2] and torch.equal(first, again)  # loaded, not recomputed
    FeatureCache(tmp_path / "cache", model_id="m2").get("train", train, counting_embed)
    assert len(calls) == 3  # another model: recomputed
    assert len(list((tmp_path / "cache").glob("train-*.pt"))) == 2


def test_asking_for_more_demos_than_train_images_says_what_to_lower(tmp_path):
    rices = RICES(torch.eye(3))
    with pytest.raises(ValueError, match="--shots"):
        rices.find(torch.eye(3)[:1], k=4)


def test_with_the_real_vision_tower_duplicates_are_retrieved_first(tmp_path, tiny_model, draw_image):
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "gray", "teal"]
    train = [
        str(draw_image(tmp_path / f"tr{i}.png", c, ("circle", "square", "triangle")[i % 3]))
        for i, c in enumerate(colors)
    ]
    queries = [train[5], train[2]]  # identical files to train images 5 and 2
    rices = RICES.from_paths(tiny_model.embed_images, train, FeatureCache(tmp_path / "c", "tiny"))
    found = rices.find(embed_paths(tiny_model.embed_images, queries), k=2)
    assert [row[-1] for row in found] == [5, 2]
