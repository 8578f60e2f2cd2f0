"""One request must not hurt the others: a request whose input breaks generation (not only a ValueError) fails
alone while the rest of its batch gets the answers they get alone; requests whose clients disconnect while
queued are cancelled before they reach the model; a 500 says nothing about the server's internals."""

import base64
import io
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from lmm.serve.batcher import Batcher, Job
from lmm.serve.protocol import Settings


@pytest.fixture(scope="module")
def model():
    from lmm.testing import tiny_lmm

    return tiny_lmm(family="llama", bridge="flamingo", gates=1.0, seed=5)


def conversation(seed: int, question: str = "what is it?", size: int = 32) -> list[dict]:
    im = Image.fromarray(np.random.RandomState(seed).randint(0, 255, (size, size, 3), dtype=np.uint8))
    return [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": question}]}]


def test_a_batch_that_fails_with_any_error_answers_each_request_alone(model):
    """The poison: an image the preprocessing cannot handle (here: a 7x7 image makes the transform raise a
    RuntimeError, as a 40,000,000 x 1 one runs out of memory). Only its own request fails."""
    calls = []

    def generate(convs, settings):
        calls.append(len(convs))
        if any(p["image"].size == (7, 7) for c in convs for m in c for p in m["content"] if p["type"] == "image"):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return model.chat(convs, **settings.kwargs())

    batcher = Batcher(generate, lambda c, s: iter(()), max_batch_size=8, max_wait_ms=300)
    try:
        s = Settings(max_new_tokens=4)
        convs = [conversation(0), conversation(9, size=7), conversation(1), conversation(2)]
        jobs = [batcher.submit(Job(c, s)) for c in convs]
        for k in (0, 2, 3):
            assert jobs[k].future.result(timeout=120) == model.chat(convs[k], max_new_tokens=4)
        with pytest.raises(RuntimeError, match="allocate"):
            jobs[1].future.result(timeout=120)
        assert calls[0] == 4 and sorted(calls[1:]) == [1, 1, 1, 1]  # the batch, then each alone
        assert batcher.stats()["errors"] == 1
    finally:
        batcher.close()


class GatedModel:
    """The tiny model, but `chat` waits for `gate` (the worker is busy) and can be told to fail."""

    def __init__(self, real):
        self.real, self.gate, self.entered, self.calls, self.fail = real, threading.Event(), threading.Event(), [], None

    def __getattr__(self, name):
        return getattr(self.real, name)

    def chat(self, convs, **kw):
        self.calls.append(len(convs))
        self.entered.set()
        self.gate.wait(60)
        if self.fail is not None:
            raise self.fail
        return self.real.chat(convs, **kw)

    def stream(self, *args, **kw):
        if self.fail is not None:
            raise self.fail
        return self.real.stream(*args, **kw)


class InProcessServer:
    """The app under uvicorn (with lmm's connection limits) in a thread on a free port."""

    def __init__(self, app):
        import uvicorn

        from lmm.serve.http import guarded_protocol
        from lmm.testing import free_port

        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", http=guarded_protocol(10, 64))
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def wire(seed: int) -> list[dict]:
    im = Image.fromarray(np.random.RandomState(seed).randint(0, 255, (32, 32, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is it?"}],
        }
    ]


def test_abandoned_queued_requests_are_cancelled_before_they_reach_the_model(model):
    from lmm.serve.app import create_app

    gated = GatedModel(model)
    app = create_app(gated, "m", max_batch_size=1, max_wait_ms=0)
    body = {"model": "m", "messages": wire(0), "max_tokens": 4}
    with InProcessServer(app) as url:
        first = {}
        t = threading.Thread(
            target=lambda: first.setdefault("r", httpx.post(url + "/v1/chat/completions", json=body, timeout=60))
        )
        t.start()
        assert gated.entered.wait(30)  # the worker is busy with the first request
        for k in range(6):  # clients that give up after 0.3 s and hang up
            with pytest.raises(httpx.TimeoutException):
                httpx.post(url + "/v1/chat/completions", json={**body, "messages": wire(k + 1)}, timeout=0.3)
        deadline = time.monotonic() + 20  # the worker is still busy: they are dropped while queued
        while app.state.batcher.stats().get("cancelled", 0) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.state.batcher.stats().get("cancelled", 0) == 6 and gated.calls == [1]
        gated.gate.set()
        t.join(60)
        assert first["r"].status_code == 200
        want = model.chat([{"role": "user", "content": conversation(0)[0]["content"]}], max_new_tokens=4)
        assert first["r"].json()["choices"][0]["message"]["content"] == want
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want
        stats = app.state.batcher.stats()
    assert stats.get("cancelled") == 6, stats
    assert gated.calls == [1, 1], gated.calls  # only the two requests whose clients waited reached the model


def test_500_body_does_not_echo_internal_exception_text(model):
    from lmm.serve.app import create_app

    gated = GatedModel(model)
    gated.gate.set()
    gated.fail = RuntimeError("secret internal detail at /srv/models/private/weights.bin")
    app = create_app(gated, "m")
    with InProcessServer(app) as url:
        body = {"model": "m", "messages": wire(0), "max_tokens": 4}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert "secret" not in r.text and "/srv" not in r.text and "RuntimeError" not in r.text, r.text
        streamed = httpx.post(url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60).text
        assert "internal_error" in streamed and "secret" not in streamed and "/srv" not in streamed, streamed
