"""The batcher on a real (tiny) model: same-settings requests share one forward; a bad request fails alone."""

import numpy as np
import pytest
from PIL import Image

from lmm.serve.batcher import Batcher, Job
from lmm.serve.protocol import Settings


@pytest.fixture(scope="module")
def model():
    from lmm.testing import tiny_lmm

    return tiny_lmm(family="llama", bridge="flamingo", gates=1.0, seed=5)


def conversation(seed: int, question: str) -> list[dict]:
    im = Image.fromarray(np.random.RandomState(seed).randint(0, 255, (32, 32, 3), dtype=np.uint8))
    return [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": question}]}]


def make_batcher(model, wait_ms: float) -> Batcher:
    def generate(convs, settings):
        return model.chat(convs, **settings.kwargs())

    def stream(conv, settings):
        prompt, images = model.render_chat(conv)
        return model.stream(prompt, images, add_special_tokens=False, stop_at_end_of_chunk=False, **settings.kwargs())

    return Batcher(generate, stream, max_batch_size=8, max_wait_ms=wait_ms)


def test_same_settings_share_a_forward_and_answers_equal_single_calls(model):
    batcher = make_batcher(model, wait_ms=300)  # long window: all jobs below land in one collection
    try:
        short, longer = Settings(max_new_tokens=4), Settings(max_new_tokens=7)
        convs = [conversation(s, "what is it?") for s in range(6)]
        jobs = [batcher.submit(Job(c, short if k % 2 else longer)) for k, c in enumerate(convs)]
        got = [j.future.result(timeout=120) for j in jobs]
        want = [model.chat(c, **j.settings.kwargs()) for c, j in zip(convs, jobs)]
        assert got == want
        stats = batcher.stats()
        assert stats["requests"] == 6 and stats["forward_batches"] == 2 and stats["largest_batch"] == 3
    finally:
        batcher.close()


def test_a_bad_request_in_a_batch_fails_alone(model):
    batcher = make_batcher(model, wait_ms=300)
    try:
        s = Settings(max_new_tokens=4)
        bad = [{"role": "user", "content": "two markers <image><image> but no image"}]
        jobs = [batcher.submit(Job(c, s)) for c in (conversation(0, "hi"), bad, conversation(1, "hi"))]
        assert jobs[0].future.result(timeout=120) == model.chat(conversation(0, "hi"), max_new_tokens=4)
        assert jobs[2].future.result(timeout=120) == model.chat(conversation(1, "hi"), max_new_tokens=4)
        with pytest.raises(ValueError, match="marker"):
            jobs[1].future.result(timeout=120)
        assert batcher.stats()["errors"] == 1
    finally:
        batcher.close()


def test_streamed_job_pieces_join_to_the_answer_and_seeded_samples_run_alone(model):
    batcher = make_batcher(model, wait_ms=50)
    try:
        pieces = []
        conv = conversation(2, "what color?")
        job = batcher.submit(Job(conv, Settings(max_new_tokens=6), on_piece=pieces.append))
        assert job.future.result(timeout=120) == "".join(pieces) == model.chat(conv, max_new_tokens=6)
        assert len(pieces) > 1
        seeded = Settings(max_new_tokens=6, do_sample=True, temperature=1.5, seed=11)
        assert not seeded.batchable
        a, b = (batcher.submit(Job(conv, seeded)) for _ in range(2))
        assert a.future.result(timeout=120) == b.future.result(timeout=120) == model.chat(conv, **seeded.kwargs())
    finally:
        batcher.close()
