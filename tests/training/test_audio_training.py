"""UnIVAL-style curriculum: a model trained on images gains an audio encoder (a tiny random Whisper) and trains on a
mixture of image, audio and video conversations, starting from its weights. Only the new modality's resampler and
marker rows are fresh; the loss falls; gradients reach only the bridge, the resamplers and the new-token rows;
mixed image + audio batches give each row what it gives alone."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmm.data import build_loader
from lmm.model import LMM, WEIGHTS_FILE
from lmm.testing import tiny_audio_config
from lmm.training import TrainConfig, Trainer, train
from lmm.training.run import build_model, loader_media

SOUNDS = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
pytestmark = pytest.mark.skipif(
    not (SOUNDS / "digits").is_dir(), reason="needs Debian's asterisk-core-sounds-en-wav (.ci/run installs it)"
)
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COMMON = {
    "seed": 0,
    "checkpoint": {"every": 0, "at_end": False},
    "logging": {"tensorboard": False, "progress": False, "plot": False},
}


def write_audio_conversations(root: Path) -> str:
    """Spoken digits (real 8 kHz recordings) with the digit as the answer, plus one 44 s clip (2 Whisper chunks)."""
    from lmm.data.audio import decode_audio, write_audio

    root.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "audio": str(SOUNDS / "digits" / f"{i}.wav"),
            "conversations": [{"from": "human", "value": "<audio>\nWhich digit?"}, {"from": "gpt", "value": WORDS[i]}],
        }
        for i in range(10)
    ]
    long = [decode_audio(str(SOUNDS / n)) for n in ("conf-adminmenu.wav", "basic-pbx-ivr-main.wav")]
    write_audio(root / "long.wav", __import__("numpy").concatenate(long), 16000)
    rows.append(
        {
            "audio": str(root / "long.wav"),
            "conversations": [{"from": "human", "value": "<audio>Menu?"}, {"from": "gpt", "value": "menu"}],
        }
    )
    path = root / "audio.json"
    path.write_text(json.dumps(rows))
    return str(path)


def write_video_conversations(root: Path) -> str:
    from PIL import Image

    from lmm.data.video import write_video

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, rgb) in enumerate((("red", (220, 30, 30)), ("blue", (30, 60, 220)))):
        write_video(
            str(root / f"v{i}.mp4"),
            [Image.new("RGB", (32, 32), tuple(c * (k + 2) // 5 for c in rgb)) for k in range(4)],
        )
        rows.append(
            {
                "video": f"v{i}.mp4",
                "conversations": [{"from": "human", "value": "<video>\nWhat colour?"}, {"from": "gpt", "value": name}],
            }
        )
    path = root / "video.json"
    path.write_text(json.dumps(rows))
    return str(path)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, tiny_dir, dataset) -> Path:
    """Stage 1: the tiny model trained for a few steps on image conversations."""
    out = tmp_path_factory.mktemp("stage1")
    cfg = TrainConfig.from_dict(
        {
            **COMMON,
            "name": "images",
            "preset": tiny_dir,
            "run_dir": str(out / "run"),
            "output_dir": str(out / "final"),
            "data": {"datasets": [{"path": dataset, "format": "conversation"}], "batch_size": 4, "max_tokens": 48},
            "optim": {"lr": 5e-3, "gate_lr_mult": 10.0},
            "schedule": {"max_steps": 3, "warmup_steps": 0, "kind": "constant"},
        }
    )
    train(cfg)
    return out / "final"


def stage2_config(tmp_path, stage1: Path, dataset: str, steps: int = 10) -> TrainConfig:
    audio = tiny_audio_config(pool=100)  # 15 tokens per 30 s window
    options = json.dumps(audio.options)
    return TrainConfig.from_dict(
        {
            **COMMON,
            "name": "audio",
            "preset": str(stage1),
            "model_overrides": ["encoders.audio.kind=whisper", f"encoders.audio.options={options}"],
            "run_dir": str(tmp_path / "run"),
            "data": {
                "datasets": [
                    {"path": dataset, "format": "conversation", "name": "images"},
                    {"path": write_audio_conversations(tmp_path / "a"), "name": "audio"},
                    {
                        "path": write_video_conversations(tmp_path / "v"),
                        "name": "video",
                        "image_root": str(tmp_path / "v"),
                    },
                ],
                "batch_size": 6,
                "max_tokens": 48,
                "num_frames": 2,
            },
            "optim": {"lr": 5e-3, "gate_lr_mult": 10.0},
            "schedule": {"max_steps": steps, "warmup_steps": 0, "kind": "constant"},
        }
    ).validate()


def test_a_stage_adds_audio_to_an_image_model_and_trains_only_the_bridge(tmp_path, stage1, dataset):
    cfg = stage2_config(tmp_path, stage1, dataset)
    model = build_model(cfg, torch.device("cpu"))
    assert set(model.encoders) == {"image", "audio"}
    # the image parts start from stage 1's trained weights; the audio resampler and the <audio> rows are fresh
    saved = load_file(stage1 / WEIGHTS_FILE)
    own = model.trainable_state_dict()
    fresh = sorted(set(own) - set(saved))
    assert fresh and all(n.startswith("resamplers.audio.") for n in fresh), fresh
    for name, value in saved.items():
        rows = value.shape[0]
        torch.testing.assert_close(own[name][:rows], value, rtol=0, atol=0, msg=name)
    assert own["embed.extra"].shape[0] == saved["embed.extra"].shape[0] + 1  # one new marker row: <audio>
    gates = [float(b.attn_gate.detach()) for b in model.xattn_blocks()]
    assert any(g != 0 for g in gates)  # stage 1 opened them, and they were kept

    loader = build_loader(cfg.data, model.tokenizer, model.image_processor, **loader_media(model))
    it = iter(loader)
    batches = [next(it) for _ in range(8)]
    batch = next(b for b in batches if "media_inputs" in b and "pixel_values" in b)
    assert "audio" in batch["media_inputs"]
    audio_id = model.media_token_ids["audio"]
    assert any("frame_mask" in b for b in batches)  # a video (2 frames) beside an image (1) in a batch
    assert any(
        "audio" in b.get("media_frame_mask", {}) for b in batches
    )  # the 44 s clip (2 chunks) beside 1-chunk ones

    # one backward: gradient only on trainable parts, and on the audio resampler and the <audio> row
    model.train()
    model(**{k: v for k, v in batch.items() if k != "task_ids"}).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad <= set(own)
    assert all(n.startswith(("resamplers.", "embed.extra", "head.extra")) or ".block." in n for n in own), own.keys()
    assert not any(p.requires_grad for p in model.encoders.parameters())  # frozen towers: image and audio
    assert any(n.startswith("resamplers.audio.") for n in with_grad) and any(
        n.startswith("resamplers.image.") for n in with_grad
    )
    row = model.embed.new_ids.tolist().index(audio_id)
    assert model.embed.extra.grad[row].abs().sum() > 0
    model.zero_grad(set_to_none=True)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = Trainer(model, cfg, loader).fit()
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first - 0.1, result.losses  # a frozen random LM: the bridge alone moves it slowly, but steadily
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, n  # trainable ones moved, frozen ones did not

    # save -> reload: the same logits on an audio + image batch
    model.eval()
    model.save_pretrained(tmp_path / "saved")
    again = LMM.from_pretrained(tmp_path / "saved", device="cpu").eval()
    b = {k: v for k, v in batch.items() if k not in ("task_ids", "labels")}
    with torch.no_grad():
        torch.testing.assert_close(again(**b).logits, model(**b).logits)


def test_a_mixed_image_and_audio_batch_gives_each_row_its_own_losses(tmp_path, stage1, dataset):
    cfg = stage2_config(tmp_path, stage1, dataset)
    model = build_model(cfg, torch.device("cpu")).eval()
    with torch.no_grad():
        for blk in model.xattn_blocks():  # open gates: media change the losses
            blk.attn_gate.fill_(0.7)
            blk.ff_gate.fill_(0.7)
    cfg.data.batch_size = 6
    batch = next(iter(build_loader(cfg.data, model.tokenizer, model.image_processor, **loader_media(model))))
    image_id, audio_id = model.image_token_id, model.media_token_ids["audio"]
    kinds = [
        ("i" if (r == image_id).any() else "") + ("a" if (r == audio_id).any() else "") for r in batch["input_ids"]
    ]
    assert "i" in kinds and "a" in kinds, kinds
    cfg.data.batch_size = 1
    singles = list(islice(build_loader(cfg.data, model.tokenizer, model.image_processor, **loader_media(model)), 6))
    with torch.no_grad():
        mixed = model(**{k: v for k, v in batch.items() if k != "task_ids"}).token_losses
        for b, one in enumerate(singles):
            assert torch.equal(one["input_ids"][0], batch["input_ids"][b, : one["input_ids"].shape[1]])
            alone = model(**{k: v for k, v in one.items() if k != "task_ids"}).token_losses[0]
            torch.testing.assert_close(mixed[b, : alone.shape[0]], alone, rtol=1e-4, atol=1e-5)
    # without the audio the audio rows' losses change (the clip is used)
    b = kinds.index("a")
    with torch.no_grad():
        other = {k: v for k, v in batch.items() if k != "task_ids"}
        other["media_inputs"] = {"audio": torch.flip(batch["media_inputs"]["audio"], dims=[0])}
        other.pop("media_frame_mask", None)
        changed = model(**other).token_losses
    assert (changed[b] - mixed[b]).abs().max() > 1e-4


def test_the_train_entry_point_hands_the_audio_encoder_to_the_loader(tmp_path, stage1, dataset):
    """`train(cfg)` builds the loader with the model's audio preprocessing: without it every audio record would be
    a no_encoder skip and the audio dataset would fail its start-up probe."""
    cfg = stage2_config(tmp_path, stage1, dataset, steps=2)
    cfg.output_dir = str(tmp_path / "final")
    result = train(cfg)
    assert result.step == 2 and all(loss == loss for loss in result.losses)
    saved = LMM.from_pretrained(tmp_path / "final", device="cpu")
    assert set(saved.encoders) == {"image", "audio"} and saved.config.video_frames == 2
