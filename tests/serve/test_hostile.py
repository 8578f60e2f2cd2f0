"""Hostile requests against a real `lmm serve`: each gets the right 4xx with the OpenAI error body, says what was
refused without echoing paths or internals, and does not disturb the innocent requests sent at the same time
(they get 200 and the same answer as alone). Budgets are checked before the work they bound, so the server's
memory stays bounded; slow and idle clients are cut off."""

import base64
import io
import json
import socket
import struct
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from lmm.testing import free_port, running_server

MAX_TOKENS = 8
QUESTION = "what is in the image?"


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def zero_png(w: int, h: int) -> bytes:
    """A valid w x h greyscale PNG of zeros, built without holding w x h bytes (a few KB for millions of pixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    if w >= h:
        idat = b"".join(z.compress(b"\x00" * (w + 1)) for _ in range(h))
    else:
        idat = z.compress(b"\x00\x00" * h)
    idat += z.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def text_bomb_png(kind: str) -> bytes:
    """A small PNG whose compressed text chunk inflates to 50 MB (past PIL's per-chunk text limit)."""

    def chunk(name: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + name + data + struct.pack(">I", zlib.crc32(name + data))

    base = png_bytes(Image.new("RGB", (8, 8), (200, 10, 10)))
    bomb = zlib.compress(b"A" * 50_000_000, 9)
    data = b"Comment\x00\x00" + bomb if kind == "zTXt" else b"Comment\x00\x01\x00\x00\x00" + bomb
    return base[:33] + chunk(kind.encode(), data) + base[33:]  # right after IHDR


def messages(url: str, question: str = QUESTION) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


def post(http: httpx.Client, base: str, key: str, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(
        base + "/v1/chat/completions",
        content=content,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )


def rss_peak_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def innocent(server, image_dir, local_model):
    """(body, expected answer) of innocent requests, the answers computed alone in this process."""
    out = []
    for i in range(3):
        path = image_dir / f"img{i}.png"
        with Image.open(path) as im:
            local = [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": im.convert("RGB")}, {"type": "text", "text": QUESTION}],
                }
            ]
        want = local_model.chat(local, max_new_tokens=MAX_TOKENS)
        body = {"model": server["name"], "messages": messages(data_url(path.read_bytes())), "max_tokens": MAX_TOKENS}
        out.append((body, want))
    return out


def hostile_requests(server, image_dir, tmp_path) -> list[tuple[str, object, int, str, list[str]]]:
    """(label, body, status, error code, strings the error body must not contain)."""
    name = server["name"]
    outside = tmp_path / "secret-target-dir"
    outside.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(outside / "secret.png")
    link = image_dir / "innocent-looking-link.png"
    if not link.is_symlink():
        link.symlink_to(outside / "secret.png")

    def req(msgs, **extra):
        return {"model": name, "messages": msgs, "max_tokens": MAX_TOKENS, **extra}

    text = [{"role": "user", "content": "hello"}]
    raw = json.dumps(req(text)).encode()
    nested = raw[:-1] + b', "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    return [
        (
            "NUL byte in a file:// URL",
            req(messages((image_dir / "img0.png").as_uri() + "%00.png")),
            400,
            "invalid_image",
            [],
        ),
        (
            "5,000-character file name",
            req(messages(image_dir.as_uri() + "/" + "a" * 5000 + ".png")),
            400,
            "invalid_image",
            [],
        ),
        (
            "symlink to outside the allowed dir",
            req(messages(link.as_uri())),
            403,
            "local_file_forbidden",
            [str(outside), "secret-target", str(tmp_path)],
        ),
        (
            "file outside the allowed dir",
            req(messages((outside / "secret.png").as_uri())),
            403,
            "local_file_forbidden",
            [str(image_dir.resolve())],
        ),
        ("zTXt text bomb", req(messages(data_url(text_bomb_png("zTXt")))), 400, "invalid_image", []),
        ("iTXt text bomb", req(messages(data_url(text_bomb_png("iTXt")))), 400, "invalid_image", []),
        ("deeply nested JSON", nested, 400, "invalid_json", ["RecursionError", "Traceback"]),
        ("lone surrogate", req([{"role": "user", "content": "hi \ud800 there"}]), 400, "invalid_text", []),
        ("5,000-digit max_tokens", raw[:-1] + b', "max_tokens": ' + b"7" * 5000 + b"}", 400, "invalid_json", []),
        ("temperature NaN", raw[:-1] + b', "temperature": NaN}', 400, "invalid_json", []),
        ("top_p NaN", raw[:-1] + b', "top_p": NaN, "temperature": 0.5}', 400, "invalid_json", []),
        ("temperature 1e999 (inf)", raw[:-1] + b', "temperature": 1e999}', 400, "invalid_value", []),
        ("40,000,000 x 1 PNG", req(messages(data_url(zero_png(40_000_000, 1)))), 400, "invalid_image", []),
        (
            "17 images",
            req(
                [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": data_url((image_dir / "img0.png").read_bytes())}}
                        ]
                        * 17,
                    }
                ]
            ),
            400,
            "too_many_images",
            [],
        ),
        (
            "12 x 6000x6000 PNGs",
            req(
                [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": data_url(zero_png(6000, 6000))}}] * 12,
                    }
                ]
            ),
            413,
            "image_too_large",
            [],
        ),
    ]


def test_hostile_requests_get_4xx_and_innocent_concurrent_requests_their_answers(server, image_dir, innocent, tmp_path):
    pid = server["pid"]
    peak_before = rss_peak_kb(pid)
    cases = hostile_requests(server, image_dir, tmp_path)
    with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=64)) as http:

        def hostile(case):
            label, body, status, code, hidden = case
            return case, post(http, server["url"], server["key"], body)

        def good(k):
            body, want = innocent[k % len(innocent)]
            return want, post(http, server["url"], server["key"], body)

        with ThreadPoolExecutor(32) as pool:
            bad_futures = [pool.submit(hostile, c) for c in cases]
            good_futures = [pool.submit(good, k) for k in range(2 * len(cases))]
            for f in bad_futures:
                (label, _, status, code, hidden), r = f.result()
                assert r.status_code == status, (label, r.text[:500])
                err = r.json()["error"]
                assert err["code"] == code and err["type"] and len(err["message"]) > 10, (label, err)
                for s in hidden:
                    assert s not in r.text, (label, s, r.text)
            for f in good_futures:
                want, r = f.result()
                assert r.status_code == 200, r.text[:500]
                assert r.json()["choices"][0]["message"]["content"] == want
    # the 12 x 36 MP request and the 40 MP strip were refused from their headers: no gigabytes decoded
    grown_mb = (rss_peak_kb(pid) - peak_before) / 1024
    assert grown_mb < 400, f"the server's peak RSS grew by {grown_mb:.0f} MB"


# --------------------------------------------------------------------------- a server with small limits

LIMITED = {
    "--max-body-mb": "1",
    "--max-images": "4",
    "--max-request-pixels": "5000",
    "--max-text-chars": "5000",
    "--header-timeout": "1",
    "--body-timeout": "2",
    "--max-connections": "8",
    "--keep-alive-timeout": "1",
}


@pytest.fixture(scope="module")
def limited(saved_model, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "limited.log"
    cmd = [
        str(Path(sys.executable).with_name("lmm")),
        "serve",
        "--model",
        str(saved_model),
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--device",
        "cpu",
        "--api-key",
        "k",
    ]
    for k, v in LIMITED.items():
        cmd += [k, v]
    base = f"http://127.0.0.1:{port}"
    with running_server(cmd, f"{base}/health", log, headers={"Authorization": "Bearer k"}):
        yield {"url": base, "name": saved_model.name, "key": "k", "port": port}
    assert "Traceback" not in log.read_text(), log.read_text()


def test_help_documents_the_limits():
    from typer.testing import CliRunner

    from lmm.cli import app

    out = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for flag in list(LIMITED) + ["--max-image-pixels"]:
        assert flag in out, flag


def test_budgets_refuse_with_413_or_400(limited, image_dir):
    name, url, key = limited["name"], limited["url"], limited["key"]
    img = data_url((image_dir / "img0.png").read_bytes())  # 32 x 32 = 1,024 pixels

    def body(content, **extra):
        return {"model": name, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}

    with httpx.Client(timeout=60) as http:
        image_part = {"type": "image_url", "image_url": {"url": img}}
        ok = post(http, url, key, body([image_part, {"type": "text", "text": "hi"}]))
        assert ok.status_code == 200, ok.text
        cases = [
            (
                "5 images > --max-images 4",
                body([{"type": "image_url", "image_url": {"url": img}}] * 5),
                400,
                "too_many_images",
            ),
            (
                "3 x 1,024 + 2,500 pixels",
                body(
                    [{"type": "image_url", "image_url": {"url": img}}] * 3
                    + [{"type": "image_url", "image_url": {"url": data_url(zero_png(50, 50))}}]
                ),
                413,
                "image_too_large",
            ),
            ("5,001 characters of text", body("x" * 5001), 413, "text_too_long"),
            ("1.5 MiB body with Content-Length", body("y" * 10, pad="z" * 1_500_000), 413, "request_too_large"),
        ]
        for label, b, status, code in cases:
            r = post(http, url, key, b)
            assert r.status_code == status and r.json()["error"]["code"] == code, (label, r.text[:300])

        def chunks():  # a chunked body (no Content-Length) of 2 MiB
            yield json.dumps(body("hi"))[:-1].encode() + b', "pad": "'
            for _ in range(64):
                yield b"p" * 32768
            yield b'"}'

        r = http.post(
            url + "/v1/chat/completions",
            content=chunks(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text[:300]
        assert post(http, url, key, body("still fine?")).status_code == 200


def recv_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def test_slow_and_idle_clients_are_cut_off(limited):
    port = limited["port"]
    # headers that never finish: 408 and closed after --header-timeout (1 s)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n")
        t = time.monotonic()
        got = recv_all(s, 15)
        assert got.startswith(b"HTTP/1.1 408") and b"request_timeout" in got and time.monotonic() - t < 14, got
    # a body that never finishes: 408 after --body-timeout (2 s)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"model"'
        )
        got = recv_all(s, 15)
        assert got.startswith(b"HTTP/1.1 408") and b"request_timeout" in got, got
    # more connections than --max-connections (8): the extra ones get a 503 at once
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
    try:
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", port))
        got = recv_all(extra, 5)
        extra.close()
        assert got.startswith(b"HTTP/1.1 503") and b"too_many_connections" in got, got
    finally:
        for s in idle:
            s.close()
    time.sleep(0.5)
    r = httpx.get(limited["url"] + "/health", headers={"Authorization": "Bearer k"}, timeout=10)
    assert r.status_code == 200
