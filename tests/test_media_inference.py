"""Video and audio after training: generate / chat / score / stream take them; frames are sampled as the training
loader samples them; the answer depends on the clip; every entry point gives the same greedy answer."""

import base64

import numpy as np
import pytest
import torch
from PIL import Image

from lmm.data.audio import encode_audio, write_audio
from lmm.data.video import sample_frames, write_video
from lmm.inputs import Audio, Video, prepare_inputs
from lmm.testing import sine_wave, tiny_lmm, tiny_media_lmm

GEN = dict(max_new_tokens=6)


def _frames(seed: int, n: int = 12, first=None) -> list[Image.Image]:
    rs = np.random.RandomState(seed)
    frames = [Image.fromarray(rs.randint(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    if first is not None:
        frames[0] = first
    return frames


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    shared_first = _frames(99, 1)[0]
    paths = []
    for s in range(2):
        p = d / f"clip{s}.mp4"
        write_video(str(p), _frames(s, first=shared_first))  # same first frame, different later frames
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def model():
    m = tiny_lmm(gates=1.0, seed=5)
    m.config.video_frames = 4
    return m.eval()


def test_video_frames_are_the_loaders_frames(model, videos):
    batch = prepare_inputs(model, ["<video>what happens?"], videos=[[videos[0]]])
    expected = torch.stack([model.image_processor(f) for f in sample_frames(str(videos[0]), 4)])
    assert batch["pixel_values"].shape[:3] == (1, 1, 4)
    assert torch.equal(batch["pixel_values"][0, 0], expected)
    # `<video>` is an image-modality item: it becomes the <image> token
    assert (batch["input_ids"] == model.image_token_id).sum() == 1


def test_a_video_changes_the_answer_and_every_frame_counts(model, videos):
    """Two clips that share their first frame give different logits: the later frames reach the model."""
    b0, b1 = (prepare_inputs(model, ["<video>what happens?"], videos=[[v]]) for v in videos)
    with torch.no_grad():
        l0, l1 = (model(**b).logits[0, -1] for b in (b0, b1))
    assert not torch.allclose(l0, l1, atol=1e-4)
    bare = tiny_lmm(gates=0.0, seed=5)
    with torch.no_grad():  # gate 0: the bare LM, whatever the clip
        z0, z1 = (bare(**b).logits[0, -1] for b in (b0, b1))
    assert torch.equal(z0, z1)


def test_video_entry_points_agree(model, videos):
    """path == frames array == PIL frames == chat part == stream, greedy, token for token."""
    prompt = "<video>what happens?"
    by_path = model.generate(prompt, videos=[videos[0]], **GEN)
    frames = sample_frames(str(videos[0]), 4)
    as_array = np.stack([np.asarray(f) for f in frames])
    assert model.generate(prompt, videos=[as_array], **GEN) == by_path
    assert model.generate(prompt, videos=[frames], **GEN) == by_path
    assert model.generate(prompt, images=[Video(videos[0])], **GEN) == by_path  # a mixed media list
    assert "".join(model.stream(prompt, videos=[videos[0]], **GEN)) == by_path
    msgs = [{"role": "user", "content": [{"type": "video", "video": str(videos[0])}, {"type": "text", "text": "hi"}]}]
    chat = model.chat(msgs, **GEN)
    prompt2, media = model.render_chat(msgs)
    assert "<video>" in prompt2 and isinstance(media[0], Video)
    assert chat == model.generate(prompt2, images=media, add_special_tokens=False, stop_at_end_of_chunk=False, **GEN)


def test_batched_images_and_videos_equal_one_at_a_time(model, videos):
    """A left-padded batch mixing an image row and video rows (padded frames masked) answers as each alone."""
    img = _frames(7, 1)[0]
    prompts = ["<image>a photo of", "<video>then<video>", "<video>a long clip about"]
    images, vids = [[img], [], []], [[], [videos[0], videos[1]], [videos[1]]]
    batched = model.generate(prompts, images=images, videos=vids, **GEN)
    alone = [model.generate(p, images=i, videos=v, **GEN) for p, i, v in zip(prompts, images, vids)]
    assert batched == alone
    assert model.generate(prompts, images=images, videos=vids, num_beams=2, **GEN) == [
        model.generate(p, images=i, videos=v, num_beams=2, **GEN) for p, i, v in zip(prompts, images, vids)
    ]


def test_video_scoring_equals_a_forward(model, videos):
    prompt, cands = "<video>it shows", [" a", " b c"]
    scores = model.score([prompt], None, cands, videos=[[videos[1]]])
    for j, c in enumerate(cands):
        b = prepare_inputs(model, [prompt + c], videos=[[videos[1]]])
        n = len(model.tokenizer(c, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logp = model(**b).logits[0, :-1].log_softmax(-1)
        ids = b["input_ids"][0, 1:]
        ref = logp[torch.arange(len(ids)), ids][-n:].sum()
        assert scores[0, j].item() == pytest.approx(ref.item(), abs=1e-4)


def test_marker_and_item_counts_must_agree(model, videos):
    with pytest.raises(ValueError, match="<video> marker"):
        model.generate("<video><video>two?", videos=[videos[0]], **GEN)
    with pytest.raises(ValueError, match="no audio encoder"):
        model.generate("<audio>hi", audios=[np.zeros(16000, dtype=np.float32)], **GEN)
    with pytest.raises(ValueError, match="video"):
        model.generate("<video>x", videos=[b"not a video at all"], **GEN)


# ------------------------------------------------------------------------------------------------ audio


@pytest.fixture(scope="module")
def audio_model():
    return tiny_media_lmm(seed=4, max_chunks=3)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    paths = []
    for k, f in enumerate((300.0, 1200.0)):
        p = d / f"tone{k}.wav"
        write_audio(p, sine_wave(f, rate=8000), 8000)  # 8 kHz file: resampled to the encoder's 16 kHz
        paths.append(p)
    return paths


def test_an_audio_clip_changes_the_answer(audio_model, clips):
    b0, b1 = (prepare_inputs(audio_model, ["<audio>what is it?"], audios=[[c]]) for c in clips)
    assert set(b0["media_inputs"]) == {"audio"}
    with torch.no_grad():
        l0, l1 = (audio_model(**b).logits[0, -1] for b in (b0, b1))
    assert not torch.allclose(l0, l1, atol=1e-4)
    with torch.no_grad():  # gate 0: the clip changes nothing
        for blk in audio_model.xattn_blocks():
            blk.attn_gate.fill_(0.0)
            blk.ff_gate.fill_(0.0)
        try:
            z0, z1 = (audio_model(**b).logits[0, -1] for b in (b0, b1))
        finally:
            for blk in audio_model.xattn_blocks():
                blk.attn_gate.fill_(1.0)
                blk.ff_gate.fill_(1.0)
    assert torch.equal(z0, z1)


def test_audio_entry_points_agree(audio_model, clips):
    """path == waveform == HF dict == bytes == chat audio part == OpenAI input_audio part, greedy."""
    from lmm.data.audio import decode_audio

    prompt = "<audio>what is it?"
    by_path = audio_model.generate(prompt, audios=[clips[1]], **GEN)
    wave = decode_audio(str(clips[1]), sampling_rate=16000)
    assert audio_model.generate(prompt, audios=[wave], **GEN) == by_path
    assert audio_model.generate(prompt, audios=[{"array": wave, "sampling_rate": 16000}], **GEN) == by_path
    assert audio_model.generate(prompt, audios=[clips[1].read_bytes()], **GEN) == by_path
    assert audio_model.generate(prompt, images=[Audio(str(clips[1]))], **GEN) == by_path
    part = {"type": "audio", "audio": str(clips[1])}
    b64 = base64.b64encode(clips[1].read_bytes()).decode()
    wire = {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}
    text = {"type": "text", "text": "what is it?"}
    a = audio_model.chat([{"role": "user", "content": [part, text]}], **GEN)
    b = audio_model.chat([{"role": "user", "content": [wire, text]}], **GEN)
    assert a == b


def test_long_clips_are_chunked_and_too_long_ones_refused(audio_model):
    long = np.zeros(16000 * 70, dtype=np.float32)  # 70 s -> 3 chunks of 30 s
    b = prepare_inputs(audio_model, ["<audio>and<audio>"], audios=[[long, sine_wave(440.0)]])
    assert b["media_inputs"]["audio"].shape[:3] == (1, 2, 3)
    assert b["media_frame_mask"]["audio"].tolist() == [[[True, True, True], [True, False, False]]]
    with pytest.raises(ValueError, match="max_chunks"):
        prepare_inputs(audio_model, ["<audio>"], audios=[[np.zeros(16000 * 100, dtype=np.float32)]])


def test_padded_chunks_do_not_change_a_clip(audio_model):
    """A short clip batched beside a long one (its padded chunks masked) answers as it does alone."""
    long = sine_wave(700.0, seconds=65.0)
    prompts = ["<audio>long", "<audio>short one"]
    batched = audio_model.generate(prompts, audios=[[long], [sine_wave(440.0)]], **GEN)
    assert batched == [audio_model.generate(p, audios=a, **GEN) for p, a in zip(prompts, [[long], [sine_wave(440.0)]])]


def test_bad_audio_is_a_clear_error(audio_model, tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    good = encode_audio(sine_wave(440.0), 16000, "wav")
    (tmp_path / "cut.wav").write_bytes(good[: len(good) // 3])
    for name in ("empty.wav", "cut.wav"):
        with pytest.raises(ValueError, match="audio"):
            audio_model.generate("<audio>x", audios=[tmp_path / name], **GEN)
    with pytest.raises(ValueError, match="not found"):
        audio_model.generate("<audio>x", audios=[tmp_path / "missing.wav"], **GEN)


def test_terminal_chat_takes_video_and_audio(audio_model, clips, tmp_path):
    """`lmm chat`'s /video, /audio and @clip.wav attach what model.chat would get; the answer is model.chat's."""
    import io

    from lmm.cli.chat import ChatSession

    audio_model.config.video_frames = 4
    clip = tmp_path / "c.mp4"
    write_video(str(clip), _frames(3, n=6))
    session = ChatSession(audio_model, max_new_tokens=6, out=io.StringIO())
    session.command(f"/video {clip}")
    got = session.ask(f"what is @{clips[0]} saying?")
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": str(clip)},
                {"type": "audio", "audio": str(clips[0])},
                {"type": "text", "text": "what is saying?"},
            ],
        }
    ]
    assert got == audio_model.chat(msgs, max_new_tokens=6)
    saved = session.save(tmp_path / "conv.json")
    import json

    parts = json.loads(saved.read_text())[0]["content"]
    assert [p["type"] for p in parts] == ["video", "audio", "text"] and parts[0]["video"] == str(clip)
    with pytest.raises(ValueError, match="not found"):
        session.command("/audio /nonexistent.wav")


def test_fewshot_with_video_and_audio_demos(audio_model, clips, videos):
    from lmm.fewshot import build_fewshot_prompt, fewshot_generate

    audio_model.config.video_frames = 4
    demos = [(Video(videos[0]), "Output: a clip."), (Audio(str(clips[0])), "Output: a tone.")]
    prompt, media = build_fewshot_prompt(demos, "Output:", query_image=Audio(str(clips[1])))
    assert prompt == "<video>Output: a clip.<|endofchunk|><audio>Output: a tone.<|endofchunk|><audio>Output:"
    expected = audio_model.generate(prompt, videos=[videos[0]], audios=[clips[0], clips[1]], **GEN)
    assert fewshot_generate(audio_model, demos, [(Audio(str(clips[1])), "Output:")], **GEN) == [expected]


def test_a_10000_frame_video_is_sampled_not_decoded_whole(model, tmp_path, monkeypatch):
    """A 10,000-frame clip: generate converts only the model's video_frames frames (seeking), in bounded memory."""
    import lmm.data.video as video

    frames = [Image.new("RGB", (16, 16), (i % 256, (i * 7) % 256, 0)) for i in range(10_000)]
    write_video(str(tmp_path / "long.mp4"), frames, fps=250)
    converted = []
    real = video._rgb
    monkeypatch.setattr(video, "_rgb", lambda frame: converted.append(frame.pts) or real(frame))
    batch = prepare_inputs(model, ["<video>what happens?"], videos=[[tmp_path / "long.mp4"]])
    assert batch["pixel_values"].shape[:3] == (1, 1, model.config.video_frames)
    assert len(converted) == model.config.video_frames
