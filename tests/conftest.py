import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def images():
    """Real PIL images of distinct colours and shapes."""
    from PIL import Image, ImageDraw

    out = []
    for i, colour in enumerate([(255, 0, 0), (0, 128, 255), (40, 200, 40), (250, 250, 0)]):
        im = Image.new("RGB", (40, 40), (255, 255, 255))
        ImageDraw.Draw(im).ellipse([4 + i, 4, 30, 30 - i], fill=colour)
        out.append(im)
    return out
