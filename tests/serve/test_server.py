"""`lmm serve` end to end: the real openai client against a real server subprocess; answers equal `model.chat`."""

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from lmm.testing import stream_chat

QUESTIONS = ["what is in the image?", "what color is the shape?"]
MAX_TOKENS = 8


def data_url(path: Path, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def load(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def wire_messages(url: str, question: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


def expected_answer(model, image_path: Path, question: str, max_tokens: int = MAX_TOKENS) -> str:
    msgs = [
        {"role": "user", "content": [{"type": "image", "image": load(image_path)}, {"type": "text", "text": question}]}
    ]
    return model.chat(msgs, max_new_tokens=max_tokens)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=server["key"], max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def answers(local_model, image_dir):
    """Reference greedy answers for every (image, question), computed in this process."""
    out = {(i, q): expected_answer(local_model, image_dir / f"img{i}.png", q) for i in range(4) for q in QUESTIONS}
    assert all(out.values()), "the tiny model should give non-empty answers"
    assert len({out[i, QUESTIONS[0]] for i in range(4)}) > 1, "answers should depend on the image"
    return out


def clean(answers) -> list[int]:
    """Images whose answers hold no U+FFFD: `model.stream` holds back a trailing incomplete UTF-8 character
    (and never flushes it), so only these streamed answers can equal the non-streamed ones exactly."""
    ok = [i for i in range(4) if not any("\ufffd" in answers[i, q] for q in QUESTIONS)]
    assert ok, "need at least one image with a clean answer"
    return ok


def test_openai_client_non_streamed_and_streamed_equal_model_chat(client, server, image_dir, answers):
    for i in clean(answers)[:2]:
        msgs = wire_messages(data_url(image_dir / f"img{i}.png"), QUESTIONS[0])
        resp = client.chat.completions.create(model=server["name"], messages=msgs, max_tokens=MAX_TOKENS, temperature=0)
        assert resp.choices[0].message.content == answers[i, QUESTIONS[0]]
        assert resp.choices[0].message.role == "assistant"
        assert resp.usage.prompt_tokens > 0 and resp.model == server["name"]

        pieces, finish = [], None
        for chunk in client.chat.completions.create(
            model=server["name"], messages=msgs, max_tokens=MAX_TOKENS, temperature=0, stream=True
        ):
            assert chunk.object == "chat.completion.chunk"
            if chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            finish = chunk.choices[0].finish_reason or finish
        assert "".join(pieces) == answers[i, QUESTIONS[0]]
        assert len(pieces) > 1  # it really streamed, piece by piece
        assert finish in ("stop", "length")


def test_multi_turn_conversation_equals_model_chat(client, server, image_dir, local_model):
    turns = [
        {"role": "system", "content": "You answer briefly."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(image_dir / "img3.png")}},
                {"type": "text", "text": "what is this?"},
            ],
        },
        {"role": "assistant", "content": "a shape"},
        {"role": "user", "content": "what color is the shape?"},
    ]
    local = [dict(t) for t in turns]
    local[1] = {
        "role": "user",
        "content": [
            {"type": "image", "image": load(image_dir / "img3.png")},
            {"type": "text", "text": "what is this?"},
        ],
    }
    resp = client.chat.completions.create(model=server["name"], messages=turns, max_tokens=MAX_TOKENS)
    assert resp.choices[0].message.content == local_model.chat(local, max_new_tokens=MAX_TOKENS)


def test_models_health_and_file_urls(client, server, image_dir, answers):
    assert [m.id for m in client.models.list().data] == [server["name"]]
    auth = {"Authorization": f"Bearer {server['key']}"}
    assert httpx.get(server["url"] + "/health", headers=auth).json()["status"] == "ok"
    # file:// works inside the operator's --allow-local-dir
    resp = client.chat.completions.create(
        model=server["name"],
        max_tokens=MAX_TOKENS,
        messages=wire_messages((image_dir / "img0.png").as_uri(), QUESTIONS[1]),
    )
    assert resp.choices[0].message.content == answers[0, QUESTIONS[1]]


def test_wrong_or_missing_api_key_is_401(server):
    bad = openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401
    r = httpx.post(server["url"] + "/v1/chat/completions", json={"model": server["name"], "messages": []})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def invalid_requests(server, image_dir, tmp_dir: Path) -> list[tuple[str, dict, object, int, str]]:
    """(label, headers, body, expected status, expected error code) for every kind of bad input."""
    name, ok = server["name"], {"Authorization": f"Bearer {server['key']}"}
    img = data_url(image_dir / "img0.png")
    outside = tmp_dir / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)

    def req(msgs, **extra):
        return {"model": name, "messages": msgs, "max_tokens": MAX_TOKENS, **extra}

    return [
        ("bad base64", ok, req(wire_messages("data:image/png;base64,@@not base64@@", "q")), 400, "invalid_image"),
        ("corrupt image", ok, req(wire_messages(data_url(image_dir / "not-an-image.png"), "q")), 400, "invalid_image"),
        (
            "unsupported type",
            ok,
            req(wire_messages("data:text/plain;base64,aGVsbG8=", "q")),
            400,
            "unsupported_image_type",
        ),
        (
            "missing local image",
            ok,
            req(wire_messages((image_dir / "missing.png").as_uri(), "q")),
            400,
            "image_not_found",
        ),
        ("file outside allowed dir", ok, req(wire_messages(outside.as_uri(), "q")), 403, "local_file_forbidden"),
        ("remote url", ok, req(wire_messages("https://example.com/cat.png", "q")), 400, "unsupported_url"),
        ("wrong api key", {"Authorization": "Bearer nope"}, req(wire_messages(img, "q")), 401, "invalid_api_key"),
        ("no api key", {}, req(wire_messages(img, "q")), 401, "invalid_api_key"),
        ("invalid json", ok, b'{"model": "x", "messages": [', 400, "invalid_json"),
        ("unknown model", ok, {**req(wire_messages(img, "q")), "model": "gpt-17"}, 404, "model_not_found"),
        (
            "more markers than images",
            ok,
            req(wire_messages(img, "compare <image> and <image>")),
            400,
            "image_count_mismatch",
        ),
        (
            "marker without image",
            ok,
            req([{"role": "user", "content": "<image> what is it?"}]),
            400,
            "image_count_mismatch",
        ),
        (
            "prompt longer than context",
            ok,
            req([{"role": "user", "content": "a photo of a cat " * 200}]),
            400,
            "context_length_exceeded",
        ),
        ("no messages", ok, req([]), 400, "invalid_messages"),
        ("bad role", ok, req([{"role": "robot", "content": "hi"}]), 400, "invalid_messages"),
        (
            "unknown part",
            ok,
            req([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]),
            400,
            "invalid_messages",
        ),
        ("n=2", ok, req(wire_messages(img, "q"), n=2), 400, "invalid_value"),
        ("negative max_tokens", ok, {**req(wire_messages(img, "q")), "max_tokens": -3}, 400, "invalid_value"),
    ]


def post(http: httpx.Client, url: str, headers: dict, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(
        url + "/v1/chat/completions", headers={**headers, "Content-Type": "application/json"}, content=content
    )


def test_each_bad_input_gets_a_clear_4xx(server, image_dir, tmp_path):
    with httpx.Client(timeout=60) as http:
        for label, headers, body, status, code in invalid_requests(server, image_dir, tmp_path):
            r = post(http, server["url"], headers, body)
            assert r.status_code == status, (label, r.text)
            err = r.json()["error"]
            assert err["code"] == code and err["type"] and len(err["message"]) > 10, (label, err)


def test_64_concurrent_mixed_requests_are_batched(server, image_dir, answers, tmp_path):
    auth = {"Authorization": f"Bearer {server['key']}"}
    valid, streamable = [], clean(answers)
    for k in range(42):
        streamed = k < 4
        i, q = streamable[k % len(streamable)] if streamed else k % 4, QUESTIONS[(k // 4) % 2]
        body = {
            "model": server["name"],
            "messages": wire_messages(data_url(image_dir / f"img{i}.png"), q),
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }
        valid.append(("valid", auth, body, 200, answers[i, q], streamed))
    bad = invalid_requests(server, image_dir, tmp_path)
    invalid = [(label, h, b, s, code, False) for label, h, b, s, code in (bad * 2)[: 64 - len(valid)]]
    jobs = valid + invalid
    jobs = [jobs[(k * 37) % 64] for k in range(64)]  # interleave valid and invalid (37 is coprime to 64)
    assert len(jobs) == 64 and len({id(j) for j in jobs}) == 64

    with httpx.Client(timeout=180, limits=httpx.Limits(max_connections=64)) as http:
        before = http.get(server["url"] + "/stats", headers=auth).json()

        def send(job):
            _, headers, body, _, _, streamed = job
            if streamed:
                return job, *stream_chat(http, server["url"], body, headers)
            r = post(http, server["url"], headers, body)
            return job, r.status_code, r.text

        t = time.perf_counter()
        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(send, jobs))
        elapsed = time.perf_counter() - t
        after = http.get(server["url"] + "/stats", headers=auth).json()

        for (label, _, _, status, want, streamed), got_status, text in results:
            assert got_status < 500, (label, text)
            if label == "valid":
                assert got_status == 200, text
                got = text if streamed else json.loads(text)["choices"][0]["message"]["content"]
                assert got == want
            else:
                assert got_status == status and json.loads(text)["error"]["code"] == want, (label, text)

        served = after["requests"] - before["requests"]
        batches = after["forward_batches"] - before["forward_batches"]
        print(
            f"\n64 concurrent requests ({len(valid)} valid, 4 of them streamed; {len(invalid)} invalid) in "
            f"{elapsed:.2f}s: {served} reached the model in {batches} forward batches "
            f"(largest {after['largest_batch']})"
        )
        assert served == len(valid)  # invalid requests are answered before they reach the model
        assert batches < served, after  # concurrent requests shared forward passes

        # one at a time vs concurrent, same 16 requests (throughput numbers for the report)
        sixteen = [j for j in valid if not j[5]][:16]
        t = time.perf_counter()
        for j in sixteen:
            assert post(http, server["url"], auth, j[2]).status_code == 200
        sequential = time.perf_counter() - t
        t = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            assert all(r.status_code == 200 for r in pool.map(lambda j: post(http, server["url"], auth, j[2]), sixteen))
        concurrent = time.perf_counter() - t
        print(
            f"16 requests one at a time: {sequential:.2f}s; concurrently (batched): {concurrent:.2f}s "
            f"({sequential / concurrent:.1f}x)"
        )

        # and the server is still healthy and right
        r = post(http, server["url"], auth, valid[5][2])
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == valid[5][4]
