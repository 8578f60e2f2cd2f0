"""A tiny random model saved to disk, real PNG images, and a real `lmm serve` subprocess on a loopback port."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmm.testing import free_port, running_server

API_KEY = "test-key-123"
MODEL_SEED = 5  # with gates=1 this tiny model's answers depend on the image and are printable text


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory) -> Path:
    from lmm.testing import tiny_lmm

    path = tmp_path_factory.mktemp("model") / "tiny-serve"
    tiny_lmm(family="llama", bridge="flamingo", gates=1.0, seed=MODEL_SEED).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def local_model(saved_model):
    """The same saved model loaded in this process: the reference answers come from here."""
    from lmm import LMM

    return LMM.from_pretrained(saved_model, device="cpu")


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    """Noise PNGs (distinct images give distinct answers from the tiny model), in an 'allowed' folder."""
    d = tmp_path_factory.mktemp("allowed")
    for s in range(4):
        Image.fromarray(np.random.RandomState(s).randint(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"img{s}.png")
    (d / "not-an-image.png").write_bytes(b"this is text, not a PNG")
    return d


@pytest.fixture(scope="session")
def server(saved_model, image_dir, tmp_path_factory, request):
    """`lmm serve` as a subprocess; yields {url, name, key}; its log is shown if it fails to start."""
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    lmm = Path(sys.executable).with_name("lmm")
    cmd = [
        str(lmm),
        "serve",
        "--model",
        str(saved_model),
        "--port",
        str(port),
        "--api-key",
        API_KEY,
        "--allow-local-dir",
        str(image_dir),
        "--max-batch-size",
        "16",
        "--batch-wait-ms",
        "20",
        "--log-level",
        "warning",
        "--device",
        "cpu",
    ]
    base = f"http://127.0.0.1:{port}"
    with running_server(cmd, f"{base}/health", log, headers={"Authorization": f"Bearer {API_KEY}"}) as proc:
        request.getfixturevalue("local_model")  # load the reference model while the server answers /health
        yield {"url": base, "name": saved_model.name, "key": API_KEY, "pid": proc.pid}
    server_log = log.read_text()
    assert "Traceback" not in server_log, server_log


@pytest.fixture
def image_question():
    """One user turn with a noise PNG and a question: (as `model.chat` takes it, as an OpenAI client sends it)."""
    import base64
    import io

    image = Image.fromarray(np.random.RandomState(1).randint(0, 255, (32, 32, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    local = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "what is it?"}]}]
    wire = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is it?"}],
        }
    ]
    return local, wire
