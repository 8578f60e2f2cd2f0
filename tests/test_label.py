"""`lmm data label` on real shards with a tiny random model: outputs equal `model.generate` on each sample alone,
original members stay byte-identical, bad inputs are counted, and killed / multi-rank runs write exactly what an
uninterrupted single run writes."""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lmm.config import ConfigError
from lmm.label import LabelConfig, run_label

MAX_NEW = 6


def _image(i: int, fmt: str) -> bytes:
    rng = np.random.RandomState(i)
    im = Image.fromarray(rng.randint(0, 255, (36, 44, 3), dtype=np.uint8))
    ImageDraw.Draw(im).ellipse([4, 4, 20 + i % 12, 30], fill=tuple(int(c) for c in rng.randint(0, 255, 3)))
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _write_tar(path, samples) -> None:
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _read_tar(path) -> list[tuple[str, dict]]:
    """(key, {ext: bytes}) in order, the way webdataset groups members."""
    out: list = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][ext] = tf.extractfile(m).read()
    return out


def _shards(root, n_shards: int, per: int, corrupt: bool = True) -> dict:
    """n_shards real tars of PNG/JPEG samples with a caption and a json member each; with `corrupt`, shard 1 also
    holds an undecodable JPEG and the last shard is cut inside its last sample. Returns {key: members} of every
    sample the labeller can use, in order."""
    os.makedirs(root, exist_ok=True)
    good: dict = {}
    for s in range(n_shards):
        samples = []
        for j in range(per):
            png = (s + j) % 2 == 0
            members = {
                "png" if png else "jpg": _image(10 * s + j, "PNG" if png else "JPEG"),
                "txt": f"original caption {s} {j}".encode(),
                "json": json.dumps({"url": f"http://example.com/{s}/{j}", "w": 44}).encode(),
            }
            samples.append((f"s{s}-{j:02d}", members))
        path = os.path.join(root, f"shard-{s:03d}.tar")
        _write_tar(
            path,
            samples[:1] + [("bad-jpeg", {"jpg": b"\xff\xd8\xff\xe0 not a jpeg", "txt": b"x"})] + samples[1:]
            if corrupt and s == 1
            else samples,
        )
        if corrupt and s == n_shards - 1:
            with tarfile.open(path) as tf:
                cut = next(m for m in tf.getmembers() if m.name.startswith(samples[-1][0])).offset_data + 100
            with open(path, "r+b") as f:
                f.truncate(cut)  # inside the last sample's image: nothing of it is readable
            samples = samples[:-1]
        good.update(samples)
    return good


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from lmm.testing import tiny_lmm

    d = tmp_path_factory.mktemp("label-model") / "model"
    tiny_lmm(family="llama", bridge="flamingo", gates=1.0, seed=5).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def model(model_dir):
    from lmm.presets import load

    return load(model_dir, device="cpu").eval()


def _cfg(model_dir, inp, out, **kw) -> LabelConfig:
    kw = {"task": "caption", "max_new_tokens": MAX_NEW, **kw}
    return LabelConfig(model=str(model_dir), input=str(inp), output=str(out), progress=False, **kw)


def _decoded(members: dict):
    ext = "png" if "png" in members else "jpg"
    return Image.open(io.BytesIO(members[ext])).convert("RGB")


def _outputs(out) -> list[tuple[str, dict]]:
    return [s for f in sorted(os.listdir(out)) if f.endswith(".tar") for s in _read_tar(os.path.join(out, f))]


def test_caption_outputs_equal_generate_alone_and_keep_original_bytes(tmp_path, model, model_dir):
    good = _shards(tmp_path / "in", 3, 5)
    prompt = "<image>A short caption:"
    alone = {k: model.generate(prompt, images=[_decoded(m)], max_new_tokens=MAX_NEW) for k, m in good.items()}
    labelled = [k for k, text in alone.items() if text.strip()]  # a random model may say nothing: dropped
    assert len(labelled) >= len(good) // 2

    result = run_label(_cfg(model_dir, tmp_path / "in", tmp_path / "out", batch_size=4), model=model)
    summary = result["summary"]
    empty = {"empty_output": len(good) - len(labelled)} if len(labelled) < len(good) else {}
    assert summary["dropped"] == {"corrupt_image": 1, "truncated_shard": 1, **empty}
    assert summary["kept"] == len(labelled) and summary["samples"] == len(good) + 1  # + the corrupt JPEG

    outs = _outputs(tmp_path / "out")
    assert [k for k, _ in outs] == labelled
    for key, members in outs:
        original = good[key]
        assert {k: members[k] for k in original} == original  # byte for byte
        assert list(members) == [*original, "label.txt", "label.json"]
        meta = json.loads(members["label.json"])
        assert members["label.txt"].decode() == meta["text"] == alone[key]
        assert meta["prompt"] == prompt and meta["model"] == "tiny-llama-flamingo"
        assert meta["conversations"] == [
            {"from": "human", "value": "<image>\nA short caption:"},
            {"from": "gpt", "value": alone[key]},
        ]


def _reference_mean_logprob(model, prompt: str, image, answer: str) -> float:
    """Mean log p(answer token) from one unbatched, unpadded forward over prompt + answer's token ids."""
    from lmm.generation import GenerationConfig, generate_ids, prepare_inputs

    batch = prepare_inputs(model, [prompt], [[image]])
    ids = generate_ids(model, batch, GenerationConfig(max_new_tokens=MAX_NEW))[0]
    assert model.tokenizer.decode(ids, skip_special_tokens=True) == answer
    full = torch.cat([batch["input_ids"], torch.tensor([ids])], 1)
    with torch.no_grad():
        logits = model(full, pixel_values=batch["pixel_values"]).logits[0].float()
    logp = logits[-len(ids) - 1 : -1].log_softmax(-1)  # from the end: early fusion lengthens the prompt
    return logp[torch.arange(len(ids)), torch.tensor(ids)].mean().item()


@pytest.mark.parametrize("bridge", ["flamingo", "projector"])
def test_vqa_left_padded_rows_equal_each_question_alone_with_scores(tmp_path, model, model_dir, bridge):
    if bridge != "flamingo":  # early fusion splices media tokens into the prompt: scores still line up
        from lmm.testing import tiny_lmm

        model = tiny_lmm(family="llama", bridge=bridge, gates=1.0, seed=5).eval()
    good = _shards(tmp_path / "in", 2, 3, corrupt=False)
    qfile = tmp_path / "q.txt"
    qs = ["what color is the shape?", "is it a circle?", "what shape is in the image and what color is it?"]
    qfile.write_text("\n".join(qs) + "\n\n")
    cfg = _cfg(model_dir, tmp_path / "in", tmp_path / "out", task="vqa", questions=str(qfile), batch_size=7)
    run_label(cfg, model=model)
    outs = dict(_outputs(tmp_path / "out"))
    for key, original in good.items():
        answers = {}
        for q in qs:
            prompt = f"<image>Question: {q} Short answer:"
            answers[q] = (prompt, model.generate(prompt, images=[_decoded(original)], max_new_tokens=MAX_NEW))
        kept = [q for q, (_, a) in answers.items() if a.strip()]
        if not kept:
            assert key not in outs
            continue
        meta = json.loads(outs[key]["label.json"])
        assert [qa["question"] for qa in meta["qa"]] == kept
        for qa in meta["qa"]:
            prompt, answer = answers[qa["question"]]
            assert qa["prompt"] == prompt and qa["answer"] == answer
            ref = _reference_mean_logprob(model, prompt, _decoded(original), answer)
            assert qa["score"] == pytest.approx(ref, abs=1e-4) and qa["score"] < 0
        assert outs[key]["label.txt"].decode() == "\n".join(qa["answer"] for qa in meta["qa"])
        turns = meta["conversations"]
        assert [t["value"] for t in turns[::2]] == [f"<image>\n{kept[0]}", *kept[1:]]
        assert [t["value"] for t in turns[1::2]] == [answers[q][1] for q in kept]
    assert len(outs) >= len(good) // 2


def test_chat_template_prompt_with_system_equals_model_chat(tmp_path, model, model_dir):
    good = _shards(tmp_path / "in", 1, 3, corrupt=False)
    cfg = _cfg(model_dir, tmp_path / "in", tmp_path / "out", chat=True, system="You label images.", batch_size=8)
    run_label(cfg, model=model)
    outs = _outputs(tmp_path / "out")
    assert outs
    for key, members in outs:
        msgs = [
            {"role": "system", "content": "You label images."},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": _decoded(good[key])},
                    {"type": "text", "text": "Describe the image in one sentence."},
                ],
            },
        ]
        assert members["label.txt"].decode() == model.chat(msgs, max_new_tokens=MAX_NEW)
        assert "You label images." in json.loads(members["label.json"])["prompt"]


def test_filters_min_score_and_dedup_are_counted(tmp_path, model, model_dir):
    good = _shards(tmp_path / "in", 2, 4, corrupt=False)
    said = lambda k: model.generate("<image>A short caption:", images=[_decoded(good[k])], max_new_tokens=MAX_NEW)  # noqa: E731
    src = next(k for k in good if k.startswith("s0") and said(k).strip())
    dup = dict(good[src], txt=b"another caption, the same image")
    shard0 = [(k, v) for k, v in good.items() if k.startswith("s0")] + [("s0-dup", dup)]
    _write_tar(tmp_path / "in" / "shard-000.tar", shard0)
    base = run_label(_cfg(model_dir, tmp_path / "in", tmp_path / "all"), model=model)["summary"]
    unfiltered = {k: json.loads(m["label.json"]) for k, m in _outputs(tmp_path / "all")}
    assert unfiltered["s0-dup"]["text"] == unfiltered[src]["text"]  # the same image, the same caption
    scores = sorted(m["score"] for m in unfiltered.values())
    threshold = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2  # between two stored scores

    cfg = _cfg(model_dir, tmp_path / "in", tmp_path / "out", min_score=threshold, dedup=True)
    summary = run_label(cfg, model=model)["summary"]
    kept = [k for k, _ in _outputs(tmp_path / "out")]
    expected, seen, dropped = [], set(), dict(base["dropped"])  # empty outputs (a random model) are dropped too
    for k, m in unfiltered.items():  # in order; duplicates are judged within a shard
        if m["score"] < threshold:
            dropped["low_score"] = dropped.get("low_score", 0) + 1
        elif (k[:2], m["text"]) in seen:
            dropped["duplicate"] = dropped.get("duplicate", 0) + 1
        else:
            seen.add((k[:2], m["text"]))
            expected.append(k)
    assert "s0-dup" not in expected and dropped["low_score"] > 0
    assert kept == expected and summary["dropped"] == dropped
    assert summary["kept"] == len(kept) and summary["samples"] == base["samples"]


def test_second_run_adds_a_field_to_the_first_runs_shards(tmp_path, model, model_dir):
    _shards(tmp_path / "in", 2, 3, corrupt=False)
    run_label(_cfg(model_dir, tmp_path / "in", tmp_path / "one", field="caption"), model=model)
    qfile = tmp_path / "q.json"
    qfile.write_text(json.dumps(["is it red?"]))
    cfg = _cfg(model_dir, tmp_path / "one", tmp_path / "two", field="vqa", task="vqa", questions=str(qfile))
    run_label(cfg, model=model)
    first, second = dict(_outputs(tmp_path / "one")), dict(_outputs(tmp_path / "two"))
    dropped = json.load(open(tmp_path / "two" / "summary.json"))["dropped"]
    assert [k for k in first if k in second] == list(second) and len(first) - len(second) == sum(dropped.values())
    assert set(dropped) <= {"empty_output"} and second
    for key, members in second.items():
        assert {k: members[k] for k in first[key]} == first[key]
        assert list(members)[-2:] == ["vqa.txt", "vqa.json"] and "caption.txt" in members
    with pytest.raises(ConfigError, match="already has a caption.txt"):
        run_label(_cfg(model_dir, tmp_path / "one", tmp_path / "three", field="caption"), model=model)


def test_image_folder_input_and_relaunch_with_other_settings_is_refused(tmp_path, model, model_dir):
    folder = tmp_path / "photos" / "sub"
    folder.mkdir(parents=True)
    for i in range(5):
        (folder / f"img{i}.png").write_bytes(_image(i, "PNG"))
    (folder / "img1.txt").write_text("a sidecar caption")
    (folder / "notes.md").write_text("not a sample")
    (folder / "img4.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    summary = run_label(_cfg(model_dir, tmp_path / "photos", tmp_path / "out", shard_size=2), model=model)["summary"]
    assert sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".tar")) == [
        "000000.tar",
        "000001.tar",
        "000002.tar",
    ]
    outs = dict(_outputs(tmp_path / "out"))
    said = {
        i: model.generate(
            "<image>A short caption:", images=[Image.open(folder / f"img{i}.png")], max_new_tokens=MAX_NEW
        )
        for i in range(4)
    }
    assert list(outs) == [f"sub/img{i}" for i in range(4) if said[i].strip()]
    for i in range(4):
        if f"sub/img{i}" in outs:
            assert outs[f"sub/img{i}"]["png"] == _image(i, "PNG")
            assert outs[f"sub/img{i}"]["label.txt"].decode() == said[i]
            assert ("txt" in outs[f"sub/img{i}"]) == (i == 1)
    if "sub/img1" in outs:
        assert outs["sub/img1"]["txt"] == b"a sidecar caption"
    empty = sum(not t.strip() for t in said.values())
    assert summary["dropped"] == {"corrupt_image": 1} | ({"empty_output": empty} if empty else {})
    with pytest.raises(ConfigError, match="other settings"):
        run_label(_cfg(model_dir, tmp_path / "photos", tmp_path / "out", shard_size=2, max_new_tokens=3), model=model)


# --------------------------------------------------------------------------- processes: kill, relaunch, ranks


def _cli(model_dir, inp, out, rank: int = 0, world: int = 1):
    env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    cmd = [sys.executable, "-m", "lmm.cli", "data", "label", "--model", str(model_dir), "--input", str(inp)]
    cmd += ["--output", str(out), "--task", "caption", "--max-new-tokens", str(MAX_NEW), "--batch-size", "2"]
    return subprocess.Popen(cmd + ["--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _files(out) -> dict:
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out)) if f.endswith(".tar")}


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory, model, model_dir):
    """8 shards and the output of one uninterrupted in-process run over them."""
    root = tmp_path_factory.mktemp("label-many")
    _shards(root / "in", 8, 3)
    torch.set_num_threads(1)
    run_label(_cfg(model_dir, root / "in", root / "ref", batch_size=2), model=model)
    return root


def test_ranks_split_shards_and_the_last_to_finish_writes_the_summary(
    tmp_path, many_shards, model, model_dir, monkeypatch
):
    out, results = tmp_path / "out", []
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        results.append(run_label(_cfg(model_dir, many_shards / "in", out, batch_size=2), model=model))
    assert results[0]["summary"] is None and results[1]["summary"] is not None  # rank 1 finished first
    assert sorted(_files(out)) == sorted(_files(many_shards / "ref"))
    by_rank = {r["rank"]: r for r in results}
    assert by_rank[0]["done"] == by_rank[1]["done"] == 4
    assert _files(out) == _files(many_shards / "ref")


def _wait_for_shards(out, n: int, procs, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if out.is_dir() and sum(f.endswith(".tar") for f in os.listdir(out)) >= n:
            return
        time.sleep(0.005)


def test_two_ranks_sigkilled_at_random_then_relaunched_equal_one_uninterrupted_run(tmp_path, many_shards, model_dir):
    """Two rank processes cover every sample exactly once, and a SIGKILL at a random point loses nothing: the
    relaunch skips the finished shards, redoes the rest, and the output is byte for byte the reference's."""
    out, rng = tmp_path / "out", random.Random()
    procs = [_cli(model_dir, many_shards / "in", out, rank=r, world=2) for r in range(2)]
    _wait_for_shards(out, rng.randint(1, 5), procs)
    time.sleep(rng.uniform(0, 0.05))
    running = [p.poll() is None for p in procs]
    # the random point may come after a rank's last shard (rank 1's is the truncated one, quick to do): that rank
    # must have finished cleanly, and the other is killed mid-run
    assert any(running) and all(r or p.returncode == 0 for r, p in zip(running, procs)), [
        p.communicate()[1].decode()[-2000:] for p in procs
    ]
    for p, r in zip(procs, running):
        if r:
            os.kill(p.pid, signal.SIGKILL)
        p.wait()
    partial, ref = _files(out), _files(many_shards / "ref")
    assert 1 <= len(partial) < 8  # killed mid-run
    assert all(ref[f] == b for f, b in partial.items())  # a shard file is whole or absent

    procs = [_cli(model_dir, many_shards / "in", out, rank=r, world=2) for r in range(2)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=180)
        assert p.returncode == 0, stderr.decode()[-2000:]
        results.append(json.loads(stdout.decode().splitlines()[0]))
    assert [r["shards"] for r in results] == [4, 4]  # shards r, r+2, ... of rank r
    assert sum(r["skipped"] for r in results) == len(partial) and sum(r["done"] for r in results) == 8 - len(partial)
    assert _files(out) == ref  # byte-identical: no duplicate, no missing sample
    keys = [k for k, _ in _outputs(out)]
    assert len(keys) == len(set(keys))
    summary, ref_summary = (json.load(open(d / "summary.json")) for d in (out, many_shards / "ref"))
    assert summary["samples"] == len(keys) + sum(n for r, n in summary["dropped"].items() if r != "truncated_shard")
    assert summary.pop("settings")["output"] != ref_summary.pop("settings")["output"] and summary == ref_summary
    assert not [f for f in os.listdir(out) if "partial" in f or "tmp" in f]


@pytest.mark.parametrize("fmt", ["pair", "conversation"])
def test_labelled_shards_are_a_training_source_with_the_documented_config(tmp_path, model, model_dir, fmt):
    """configs/label_train.yaml reads the output as it is: pairs train on FIELD.txt, conversations on the turns in
    FIELD.json (the prompt asked, the model's answer as the assistant's loss span)."""
    from lmm.data.loader import build_loader
    from lmm.training.config import load_train_config

    _shards(tmp_path / "in", 2, 3, corrupt=False)
    run_label(_cfg(model_dir, tmp_path / "in", tmp_path / "out"), model=model)
    texts = {k: m["label.txt"].decode() for k, m in _outputs(tmp_path / "out")}
    assert texts
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "label_train.yaml")
    field = "label.txt" if fmt == "pair" else "label.json"
    ds = f"data.datasets=[{{path: {tmp_path / 'out'}, format: {fmt}, text_key: {field}, shuffle: false}}]"
    cfg = load_train_config(config, [ds, "data.epochs=1", "data.batch_size=1", "data.max_tokens=256"])
    assert cfg.data.datasets[0].text_key == field
    loader = build_loader(cfg.data, model.tokenizer, model.image_processor)
    learned = []
    for batch in loader:
        assert batch["pixel_values"].abs().sum() > 0  # the sample's image came along
        labels = batch["labels"][0]
        learned.append(model.tokenizer.decode(labels[labels != -100], skip_special_tokens=True).strip())
    assert learned == [t.strip() for t in texts.values()]
    assert loader.bad_sample_counts() == {}


def test_similarity_from_the_contrastive_head_and_min_similarity(tmp_path):
    from lmm.testing import tiny_lmm

    clip_model = tiny_lmm(family="llama", bridge="flamingo", gates=1.0, seed=2, contrastive_dim=16).eval()
    good = _shards(tmp_path / "in", 1, 6, corrupt=False)
    base = dict(similarity=True, model_id="clip-tiny")
    run_label(_cfg("unused", tmp_path / "in", tmp_path / "all", **base), model=clip_model)
    metas = {k: json.loads(m["label.json"]) for k, m in _outputs(tmp_path / "all")}
    assert len(metas) >= 3
    for key, meta in metas.items():
        ref = clip_model.similarity([_decoded(good[key])], [meta["text"]])[0, 0].item()
        assert meta["similarity"] == pytest.approx(ref, abs=1e-5) and meta["model"] == "clip-tiny"
    sims = sorted(m["similarity"] for m in metas.values())
    cut = (sims[0] + sims[1]) / 2
    summary = run_label(_cfg("unused", tmp_path / "in", tmp_path / "out", min_similarity=cut, **base), model=clip_model)
    assert [k for k, _ in _outputs(tmp_path / "out")] == [k for k, m in metas.items() if m["similarity"] >= cut]
    assert summary["summary"]["dropped"]["low_similarity"] == 1
    with pytest.raises(ConfigError, match="needs --similarity"):
        run_label(_cfg("unused", tmp_path / "in", tmp_path / "x", min_similarity=0.1), model=clip_model)


def test_similarity_from_an_open_clip_model_given_by_path(tmp_path, model, model_dir):
    import open_clip
    from safetensors.torch import save_file

    arch = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    config = tmp_path / "tiny-label-clip.json"
    config.write_text(json.dumps(arch))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    clip = open_clip.create_model("tiny-label-clip").eval()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, tmp_path / "clip.safetensors")
    _, _, preprocess = open_clip.create_model_and_transforms("tiny-label-clip")
    tokenize = open_clip.get_tokenizer("tiny-label-clip")

    good = _shards(tmp_path / "in", 1, 4, corrupt=False)
    kw = dict(clip_model=str(config), clip_checkpoint=str(tmp_path / "clip.safetensors"))
    run_label(_cfg(model_dir, tmp_path / "in", tmp_path / "out", **kw), model=model)
    outs = _outputs(tmp_path / "out")
    assert outs
    for key, members in outs:
        meta = json.loads(members["label.json"])
        with torch.no_grad():
            img = clip.encode_image(preprocess(_decoded(good[key]))[None], normalize=True)
            txt = clip.encode_text(tokenize([meta["text"]]), normalize=True)
        assert meta["similarity"] == pytest.approx((img * txt).sum().item(), abs=1e-5)
    with pytest.raises(ConfigError, match="go together"):
        _cfg(model_dir, tmp_path / "in", tmp_path / "x", clip_model=str(config)).validate()


def test_prompt_styles_and_their_mistakes(tmp_path, model, model_dir):
    from lmm.label import build_questions

    qfile = tmp_path / "q.txt"
    qfile.write_text("what is it?\nhow many?\n")
    vqa = _cfg(model_dir, "in", "out", task="vqa", questions=str(qfile), prompt="Q: {question} A:")
    vqa.validate()
    assert [q.prompt for q in build_questions(vqa, model)] == ["<image>Q: what is it? A:", "<image>Q: how many? A:"]
    assert [q.user for q in build_questions(vqa, model)] == ["<image>\nwhat is it?", "<image>\nhow many?"]
    plain = _cfg(model_dir, "in", "out", task=None, prompt="A photo of")
    assert [(q.prompt, q.user) for q in build_questions(plain, model)] == [("<image>A photo of", "<image>\nA photo of")]
    for kw, message in [
        (dict(task=None), "say what to ask"),
        (dict(prompt="x"), "not both"),
        (dict(task="vqa", questions=str(qfile), prompt="no slot"), "put {question}"),
        (dict(task="vqa"), "needs --questions"),
        (dict(system="be brief"), "add --chat"),
        (dict(field="a.b"), "--field must be"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            _cfg(model_dir, "in", "out", **kw).validate()
    with pytest.raises(ConfigError, match="exactly one <image>"):
        build_questions(_cfg(model_dir, "in", "out", task=None, prompt="<image><image>two?"), model)


@pytest.mark.parametrize("media", ["video", "audio"])
def test_video_and_audio_folders_are_labelled_as_generate_answers_each_clip(tmp_path, media):
    """--media video|audio: each clip's label equals model.generate on that clip alone (frames sampled, audio
    decoded as training does); a corrupt clip is counted and skipped."""
    import numpy as np

    from lmm.data.audio import write_audio
    from lmm.data.video import write_video
    from lmm.testing import sine_wave, tiny_media_lmm

    model = tiny_media_lmm(seed=5)
    model.save_pretrained(tmp_path / "m")
    inp = tmp_path / "clips"
    inp.mkdir()
    for k in range(3):
        if media == "video":
            rs = np.random.RandomState(k)
            write_video(
                str(inp / f"c{k}.mp4"), [Image.fromarray(rs.randint(0, 255, (32, 32, 3), np.uint8)) for _ in range(5)]
            )
        else:
            write_audio(inp / f"c{k}.wav", sine_wave(300.0 + 400 * k, rate=8000), 8000)
    (inp / f"bad.{'mp4' if media == 'video' else 'wav'}").write_bytes(b"RIFF\x00\x00 definitely not media")
    marker = "<video>" if media == "video" else "<audio>"
    prompt = f"{marker}A short caption:"
    result = run_label(_cfg(tmp_path / "m", inp, tmp_path / "out", media=media, batch_size=2), model=model)
    ext = "mp4" if media == "video" else "wav"
    alone = {
        f"c{k}": model.generate(prompt, **{f"{media}s": [inp / f"c{k}.{ext}"]}, max_new_tokens=MAX_NEW)
        for k in range(3)
    }
    assert result["summary"]["dropped"].get(f"corrupt_{media}") == 1
    outs = dict(_outputs(tmp_path / "out"))
    assert outs and all(json.loads(m["label.json"])["prompt"] == prompt for m in outs.values())
    assert {k: m["label.txt"].decode() for k, m in outs.items()} == {k: t for k, t in alone.items() if t.strip()}
    assert all(outs[k][ext] == (inp / f"{k}.{ext}").read_bytes() for k in outs)  # the clip kept byte for byte
    with pytest.raises(ConfigError, match="--media image"):
        _cfg(tmp_path / "m", inp, tmp_path / "o2", media=media, similarity=True).validate()
