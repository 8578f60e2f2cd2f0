"""`lmm serve` with video (`video_url`, vLLM's convention) and audio (OpenAI's `input_audio`) through the real openai
client: the answer equals `model.chat` on the same clip; bad clips and over-budget requests are 4xx."""

import base64
import sys
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from lmm.data.audio import encode_audio
from lmm.data.video import write_video
from lmm.testing import free_port, running_server, sine_wave, tiny_media_lmm

KEY = "media-key"
TOKENS = 6


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    for s in range(2):
        rs = np.random.RandomState(s)
        write_video(
            str(d / f"clip{s}.mp4"), [Image.fromarray(rs.randint(0, 255, (32, 32, 3), np.uint8)) for _ in range(6)]
        )
        (d / f"tone{s}.wav").write_bytes(encode_audio(sine_wave(300.0 * (s + 1), rate=8000), 8000, "wav"))
    return d


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny flamingo model with an audio encoder, open gates, 4 frames per video, saved to disk."""
    model = tiny_media_lmm()
    path = tmp_path_factory.mktemp("m") / "tiny-media"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def local(saved):
    from lmm import LMM

    return LMM.from_pretrained(saved, device="cpu")


@pytest.fixture(scope="module")
def client(saved, files, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "serve.log"
    cmd = [str(Path(sys.executable).with_name("lmm")), "serve", "--model", str(saved), "--port", str(port)]
    cmd += ["--api-key", KEY, "--allow-local-dir", str(files), "--device", "cpu", "--log-level", "warning"]
    cmd += ["--max-audio-seconds", "90", "--max-videos", "2"]  # budgets of the server, beside the model's own
    with running_server(cmd, f"http://127.0.0.1:{port}/health", log, headers={"Authorization": f"Bearer {KEY}"}):
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=120)
    assert "Traceback" not in log.read_text(), log.read_text()


def _ask(client, part: dict, question: str = "what is this?") -> str:
    r = client.chat.completions.create(
        model="tiny-media",
        messages=[{"role": "user", "content": [part, {"type": "text", "text": question}]}],
        max_tokens=TOKENS,
    )
    return r.choices[0].message.content


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_video_url_answers_as_model_chat(client, local, files):
    for s in range(2):
        clip = files / f"clip{s}.mp4"
        expected = local.chat(
            [
                {
                    "role": "user",
                    "content": [{"type": "video", "video": str(clip)}, {"type": "text", "text": "what is this?"}],
                }
            ],
            max_new_tokens=TOKENS,
        )
        data_url = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + _b64(clip)}}
        assert _ask(client, data_url) == expected
        file_url = {"type": "video_url", "video_url": {"url": f"file://{clip}"}}
        assert _ask(client, file_url) == expected


def test_input_audio_answers_as_model_chat(client, local, files):
    for s in range(2):
        clip = files / f"tone{s}.wav"
        expected = local.chat(
            [
                {
                    "role": "user",
                    "content": [{"type": "audio", "audio": str(clip)}, {"type": "text", "text": "what is this?"}],
                }
            ],
            max_new_tokens=TOKENS,
        )
        got = _ask(client, {"type": "input_audio", "input_audio": {"data": _b64(clip), "format": "wav"}})
        assert got == expected


@pytest.mark.parametrize(
    "part, status, code",
    [
        (
            {
                "type": "input_audio",
                "input_audio": {"data": base64.b64encode(b"RIFF....garbage").decode(), "format": "wav"},
            },
            400,
            "invalid_audio",
        ),
        ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, 400, "invalid_audio"),
        ({"type": "input_audio", "input_audio": {"data": "@@not-base64@@", "format": "wav"}}, 400, "invalid_audio"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "exe"}}, 400, "unsupported_audio_type"),
        (
            {
                "type": "video_url",
                "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(b"\x00" * 64).decode()},
            },
            400,
            "invalid_video",
        ),
        ({"type": "video_url", "video_url": {"url": "data:text/plain;base64,AAAA"}}, 400, "unsupported_video_type"),
        ({"type": "video_url", "video_url": {"url": "file:///etc/passwd"}}, 403, "local_file_forbidden"),
        ({"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}, 400, "unsupported_url"),
    ],
)
def test_bad_media_are_4xx(client, part, status, code):
    with pytest.raises(openai.APIStatusError) as e:
        _ask(client, part)
    assert e.value.status_code == status
    assert e.value.body["code"] == code


def test_a_clip_longer_than_the_encoder_takes_is_a_400(client):
    """The model's encoder takes 2 chunks of 30 s: a 70 s clip is refused before it reaches a batch."""
    long = base64.b64encode(encode_audio(np.zeros(16000 * 70, np.float32), 16000, "wav")).decode()
    with pytest.raises(openai.APIStatusError) as e:
        _ask(client, {"type": "input_audio", "input_audio": {"data": long, "format": "wav"}})
    assert e.value.status_code == 400 and "max_chunks" in e.value.body["message"]


def test_the_servers_media_budgets_are_4xx(client, files):
    """--max-audio-seconds 90: a 100 s clip is a 413 from its header (before the encoder is asked); --max-videos 2:
    three video parts are a 400."""
    clip = base64.b64encode(encode_audio(np.zeros(16000 * 100, np.float32), 16000, "wav")).decode()
    with pytest.raises(openai.APIStatusError) as e:
        _ask(client, {"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}})
    assert e.value.status_code == 413 and e.value.body["code"] == "audio_too_long"
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + _b64(files / "clip0.mp4")}}
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(
            model="tiny-media", messages=[{"role": "user", "content": [video, video, video]}], max_tokens=TOKENS
        )
    assert e.value.status_code == 400 and e.value.body["code"] == "too_many_videos"
