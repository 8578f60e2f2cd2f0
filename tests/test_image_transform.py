"""ImageTransform reproduces the PIL preprocessing it replaces (open_clip's, torchvision's) to within one grey
level, and towers pick it up (or keep their own transform where it would not match)."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from lmm.backbones.image_transform import ImageTransform

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
ONE_LEVEL = 1 / 255 / min(STD) + 1e-5  # one grey level after normalisation


def photo(w: int, h: int) -> Image.Image:
    """A smooth image with edges (gradients + a disc), like a photo rather than noise."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack(
        [
            x * 255 // max(w - 1, 1),
            y * 255 // max(h - 1, 1),
            ((x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(w, h) / 3) ** 2) * 200,
        ],
        -1,
    )
    return Image.fromarray(arr.astype(np.uint8))


@pytest.mark.parametrize("w,h", [(256, 256), (640, 480), (300, 500), (64, 64), (100, 40)])
def test_matches_torchvision_pil_pipeline(w, h):
    im = photo(w, h)
    ref = T.Compose(
        [
            T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )(im)
    out = ImageTransform(224, MEAN, STD)(im)
    assert out.shape == ref.shape == (3, 224, 224) and out.dtype == torch.float32
    assert (out - ref).abs().max() <= ONE_LEVEL
    assert (out - ref).abs().mean() < 0.05 * ONE_LEVEL  # almost every pixel identical


def test_squash_mode_resizes_both_sides_without_crop():
    im = photo(300, 120)
    ref = T.Compose(
        [T.Resize((64, 64), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(), T.Normalize(MEAN, STD)]
    )(im)
    out = ImageTransform(64, MEAN, STD, resize_mode="squash")(im)
    assert (out - ref).abs().max() <= ONE_LEVEL


def test_uint8_half_plus_normalize_equals_the_whole_and_accepts_tensors():
    tf = ImageTransform(32, MEAN, STD)
    im = photo(50, 40)
    u8 = tf.resize_crop(im)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 32, 32)
    assert torch.equal(tf.normalize(u8), tf(im))
    assert torch.equal(tf(torch.from_numpy(np.array(im)).permute(2, 0, 1)), tf(im))
    batch = torch.stack([u8, u8])[None]  # (1, 2, 3, H, W): any leading dims
    assert tf.normalize(batch, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="uint8"):
        tf(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="resize_mode"):
        ImageTransform(32, MEAN, STD, resize_mode="longest")


def test_open_clip_tower_uses_it_and_matches_open_clip_own_transform():
    import open_clip

    from lmm.backbones.vision import build_vision_tower
    from lmm.config import VisionConfig
    from lmm.testing import TINY_VIT

    tower = build_vision_tower(
        VisionConfig(name="lmm-tiny-vit", model_cfg=TINY_VIT, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    )
    assert tower.preprocess == ImageTransform(32, (0.5,) * 3, (0.25,) * 3, "bicubic", "shortest")
    _, _, own = open_clip.create_model_and_transforms("lmm-tiny-vit", image_mean=(0.5,) * 3, image_std=(0.25,) * 3)
    for im in (photo(200, 120), photo(20, 30)):
        assert (tower.preprocess(im) - own(im)).abs().max() <= 1 / 255 / 0.25 + 1e-5
    # configurations it does not reproduce keep open_clip's own transform
    assert ImageTransform.from_open_clip({"size": (32, 32), "mean": MEAN, "std": STD, "resize_mode": "longest"}) is None
    assert ImageTransform.from_open_clip({"size": (32, 48), "mean": MEAN, "std": STD}) is None


@pytest.mark.parametrize("kind,mode", [("clip", "shortest"), ("siglip", "squash")])
def test_hf_towers_follow_their_processors(kind, mode):
    """CLIPImageProcessor: shortest side + centre crop; SiglipImageProcessor: resize to size x size."""
    from lmm.backbones.vision import build_vision_tower
    from lmm.testing import tiny_vision_config

    tf = build_vision_tower(tiny_vision_config(kind)).preprocess
    assert isinstance(tf, ImageTransform) and tf.resize_mode == mode and tf.size == 32
