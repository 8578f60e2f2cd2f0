"""The frozen-cache batch source: same losses as the full model on the same samples, and exact resume."""

import pytest
import torch
from PIL import Image

from lmm.testing import tiny_lmm
from lmm.training.frozen_cache import CachedConversationBatches, ConversationSample


def _samples(tmp_path):
    out = []
    for i, (colour, answer) in enumerate([((255, 0, 0), "red"), ((0, 0, 255), "blue"), ((0, 255, 0), "green")]):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (32, 32), colour).save(path)
        for q in ("what color is the shape?", "what color?"):
            out.append(
                ConversationSample(
                    str(path), [{"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": answer}]
                )
            )
    return out


def test_cached_batches_give_the_full_models_loss(tmp_path):
    torch.set_num_threads(1)
    model = tiny_lmm(gates=0.7, seed=3, cross_attn_layers=[2, 3])
    model.config.system_prompt = "be brief"
    samples = _samples(tmp_path)
    source = CachedConversationBatches(model, samples, batch_size=4, seed=0)
    assert (source.num_images, source.num_sequences) == (3, 6)
    batch = next(iter(source))
    assert batch["prefix_layer"] == 2 and "pixel_values" not in batch
    with torch.no_grad():
        fast = model(**batch).loss
        full = model(
            batch["input_ids"],
            batch["attention_mask"],
            labels=batch["labels"],
            vision_features=batch["vision_features"],
        ).loss
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    # the system prompt was rendered into the rows; labels cover the answers only
    text = model.tokenizer.decode(batch["input_ids"][0])
    assert "be brief" in text
    answers = {model.tokenizer.decode([t for t in row if t != -100]).strip() for row in batch["labels"].tolist()}
    assert all(a.split("<|im_end|>")[0] in {"red", "blue", "green"} for a in answers)


@pytest.mark.parametrize("balance", [False, True])
def test_resume_continues_with_the_next_batch(tmp_path, balance):
    model = tiny_lmm(seed=3, cross_attn_layers=[2, 3])
    samples = _samples(tmp_path)
    a = CachedConversationBatches(model, samples, batch_size=4, seed=1, balance_answers=balance)
    it = iter(a)
    seen = [next(it)["input_ids"] for _ in range(3)]  # crosses an epoch boundary (6 samples, batch 4)
    state = a.state_dict()
    want = [next(it)["input_ids"] for _ in range(2)]
    b = CachedConversationBatches(model, samples, batch_size=4, seed=1, balance_answers=balance)
    b.load_state_dict(state)
    it_b = iter(b)
    got = [next(it_b)["input_ids"] for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(got, want)) and len(seen) == 3


def _yes_no(q, a, image="img.png"):
    return ConversationSample(
        image, [{"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": a}]
    )


def test_answer_balanced_weights_remove_the_text_prior():
    from lmm.training.frozen_cache import answer_balanced_weights

    # "is it red?" is "no" 7 times in 8; "what shape?" has three answers 1:1:2; "only one?" has one answer
    samples = (
        [_yes_no("is it red?", "no")] * 7
        + [_yes_no("is it red?", "yes")]
        + [_yes_no("what shape?", a) for a in ("circle", "square", "triangle", "triangle")]
        + [_yes_no("only one?", "yes")] * 2
    )
    w = answer_balanced_weights(samples)
    mass = {}
    for s, p in zip(samples, w):
        key = (s.messages[0]["content"], s.messages[1]["content"])
        mass[key] = mass.get(key, 0.0) + p
    assert abs(w.sum() - 1) < 1e-12
    # every answer of a question gets the same share; each question keeps its share of the data
    assert abs(mass[("<image>\nis it red?", "no")] - 4 / 14) < 1e-12
    assert abs(mass[("<image>\nis it red?", "yes")] - 4 / 14) < 1e-12
    for a in ("circle", "square", "triangle"):
        assert abs(mass[("<image>\nwhat shape?", a)] - 4 / 14 / 3) < 1e-12
    assert abs(mass[("<image>\nonly one?", "yes")] - 2 / 14) < 1e-12


def test_balanced_batches_draw_rare_answers_as_often_as_common_ones(tmp_path):
    model = tiny_lmm(seed=3, cross_attn_layers=[2, 3])
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "r.png")
    img = str(tmp_path / "r.png")
    samples = [_yes_no("is it red?", "no", img)] * 9 + [_yes_no("is it red?", "yes", img)]
    yes_id = model.tokenizer("yes", add_special_tokens=False)["input_ids"][0]

    def yes_fraction(balance):
        src = CachedConversationBatches(model, samples, batch_size=10, seed=0, balance_answers=balance)
        it = iter(src)
        labels = torch.cat([next(it)["labels"] for _ in range(200)])
        return (labels == yes_id).any(1).float().mean().item()

    assert abs(yes_fraction(False) - 0.1) < 1e-6  # plain epochs: each sample once
    assert abs(yes_fraction(True) - 0.5) < 0.05  # balanced: yes as often as no


def test_resuming_with_another_sampling_setting_names_the_fix(tmp_path):
    from lmm.config import ConfigError

    model = tiny_lmm(seed=3, cross_attn_layers=[2, 3])
    samples = _samples(tmp_path)
    state = CachedConversationBatches(model, samples, batch_size=4, seed=1).state_dict()
    with pytest.raises(ConfigError, match="balance_answers=False, this run uses balance_answers=True.*resume=null"):
        CachedConversationBatches(model, samples, batch_size=4, seed=1, balance_answers=True).load_state_dict(state)
    with pytest.raises(ConfigError, match="seed 1, this run uses seed 2.*resume=null"):
        CachedConversationBatches(model, samples, batch_size=4, seed=2).load_state_dict(state)


# ---------------------------------------------------------------------- any conversation / pair dataset (issue 21)


def _generic_data(root, dataset_path):
    """The session's conversation JSONL, plus image-caption pairs and two-image interleaved documents."""
    import json

    from tests.training.conftest import COLORS

    paths = []
    for i, colour in enumerate(COLORS):
        p = root / f"pair{i}.png"
        Image.new("RGB", (32, 32), COLORS[colour]).save(p)
        paths.append(str(p))
    (root / "pairs.jsonl").write_text(
        "".join(json.dumps({"image": p, "caption": f"a {c} square"}) + "\n" for p, c in zip(paths, COLORS))
    )
    docs = [
        {"texts": [None, "first", None, f"then {c}"], "images": [paths[0], None, p, None]}
        for p, c in zip(paths, COLORS)
    ]
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return [
        {"path": dataset_path, "format": "conversation"},
        {"path": str(root / "pairs.jsonl"), "format": "pair"},
        {"path": str(root / "docs.jsonl"), "format": "obelics"},
    ]


def _cache_config(tmp_path, tiny_dir, datasets, **kw):
    from lmm.training.config import TrainConfig

    d = {
        "name": "fc",
        "preset": tiny_dir,
        "run_dir": str(tmp_path / "run"),
        "frozen_cache": True,
        "freeze_new_token_rows": True,
        "data": {"datasets": datasets, "batch_size": 8, "max_tokens": 64},
    }
    for k, v in kw.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return TrainConfig.from_dict(d)


def test_frozen_cache_batches_equal_the_full_forward_on_generic_data(tmp_path, tiny_dir, dataset):
    """Conversations, pairs and two-image documents from files: each cached batch's loss is the loss of the full
    forward (every layer, pixels through the vision tower) on the same rows, and its texts are the loader's."""
    from lmm.data.formats import MediaRef
    from lmm.data.text import encode_conversation, encode_document
    from lmm.model import LMM
    from lmm.training.frozen_cache import dataset_samples, frozen_cache_source

    cfg = _cache_config(tmp_path, tiny_dir, _generic_data(tmp_path, dataset)).validate()
    model = LMM.from_pretrained(tiny_dir, device="cpu")
    with torch.no_grad():  # open the gates so that the images change the loss
        for block in model.xattn_blocks():
            block.attn_gate.fill_(0.8)
            block.ff_gate.fill_(0.8)
    model.config.system_prompt = "be brief"
    logs = []
    source = frozen_cache_source(cfg, model, log=logs.append)
    samples = dataset_samples(cfg.data, model)
    assert len(samples) == 48 + 4 + 4 and source.num_images == 48 + 4 and "56 samples" in logs[-1]
    first = encode_conversation(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "<image>\nwhat color is the shape?"},
            {"role": "assistant", "content": "red"},
        ],
        model.tokenizer,
    )
    assert samples[0].input_ids == tuple(first.input_ids)  # the model's system prompt, as model.chat renders
    doc = encode_document(
        [MediaRef(samples[-1].media[0]), "first", MediaRef(samples[-1].media[1]), "then yellow"], model.tokenizer
    )
    assert samples[-1].input_ids == tuple(doc.input_ids) and len(samples[-1].media) == 2
    order = source._order(0)
    it = iter(source)
    model.eval()
    for b in range(4):
        batch = next(it)
        rows = [samples[i] for i in order[8 * b : 8 * b + 8]]
        M = max(len(s.media) for s in rows)
        pixels = torch.zeros(len(rows), M, 1, *model.pixel_values(rows[0].media[:1]).shape[1:])
        for r, s in enumerate(rows):
            pixels[r, : len(s.media), 0] = model.pixel_values(list(s.media))
        with torch.no_grad():
            fast = model(**batch).loss
            full = model(batch["input_ids"], batch["attention_mask"], pixel_values=pixels, labels=batch["labels"]).loss
            blind = model(
                batch["input_ids"],
                batch["attention_mask"],
                pixel_values=torch.zeros_like(pixels),
                labels=batch["labels"],
            ).loss
        torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
        assert abs(float(fast - blind)) > 1e-4  # the images matter, so the equality above is not vacuous
        for r, s in enumerate(rows):
            n = len(s.input_ids)
            assert batch["input_ids"][r, :n].tolist() == list(s.input_ids)
            assert int(batch["attention_mask"][r].sum()) == n


@pytest.mark.parametrize(
    "change, match",
    [
        ({"freeze_new_token_rows": False}, "freeze_new_token_rows: true"),
        ({"data": {"packing": True}}, "packing"),
        ({"data": {"datasets": [{"path": "PATH", "format": "video"}]}}, "video"),
        ({"data": {"datasets": [{"path": "PATH", "weight": 2.0}, {"path": "PATH", "name": "b"}]}}, "weights"),
        (
            {
                "data": {
                    "datasets": [],
                    "stages": [{"datasets": [{"path": "PATH"}], "steps": 2}, {"datasets": [{"path": "PATH"}]}],
                }
            },
            "curriculum",
        ),
        ({"distributed": "ddp"}, "one process"),
    ],
)
def test_frozen_cache_refuses_what_it_cannot_hold_and_says_why(tmp_path, tiny_dir, dataset, change, match):
    import json

    from lmm.config import ConfigError

    change = json.loads(json.dumps(change).replace("PATH", dataset))
    with pytest.raises(ConfigError, match=match):
        cfg = _cache_config(tmp_path, tiny_dir, [{"path": dataset, "format": "conversation"}], **change)
        cfg.validate(world_size=1)


def test_frozen_cache_refuses_models_whose_prefix_is_not_frozen_text(tmp_path):
    from types import SimpleNamespace as NS

    from lmm.config import ConfigError
    from lmm.training.frozen_cache import check_model

    with pytest.raises(ConfigError, match="flamingo bridge.*projector"):
        check_model(NS(config=NS(bridge=NS(kind="projector"), lora=NS(r=0))))
    with pytest.raises(ConfigError, match="LoRA"):
        check_model(NS(config=NS(bridge=NS(kind="flamingo"), lora=NS(r=8))))
    check_model(NS(config=NS(bridge=NS(kind="flamingo"), lora=NS(r=0))))


def test_frozen_cache_memory_bound_is_a_clear_error(tmp_path, tiny_dir, dataset):
    from lmm.config import ConfigError
    from lmm.model import LMM
    from lmm.training.frozen_cache import frozen_cache_source

    cfg = _cache_config(
        tmp_path, tiny_dir, [{"path": dataset, "format": "conversation"}], frozen_cache_max_gib=1e-6
    ).validate()
    match = r"would hold [\d.]+ KiB \(48 images x .* over the bound of 1.0 KiB; raise frozen_cache_max_gib"
    with pytest.raises(ConfigError, match=match):
        frozen_cache_source(cfg, LMM.from_pretrained(tiny_dir, device="cpu"), log=lambda m: None)


def test_a_frozen_cache_run_trains_on_a_conversation_file_and_evaluates_held_out_data(tmp_path, tiny_dir, dataset):
    """`train()` end to end on generic data: the cached source, and eval.datasets (exact match and choice, with the
    blind baseline) at eval.every and at the end."""
    from lmm.training.run import train

    cfg = _cache_config(
        tmp_path,
        tiny_dir,
        [{"path": dataset, "format": "conversation"}],
        schedule={"max_steps": 4, "warmup_steps": 0},
        checkpoint={"every": 0, "at_end": False},
        logging={"tensorboard": False, "progress": False, "plot": False, "log_every": 1},
        eval={
            "every": 2,
            "limit": 6,
            "batch_size": 4,
            "datasets": [{"path": dataset, "name": "heldout"}, {"path": dataset, "name": "choice", "metric": "choice"}],
        },
    )
    result = train(cfg)
    assert result.step == 4 and len(result.losses) == 4
    for key in ("heldout/accuracy", "heldout/blind_accuracy", "choice/accuracy", "choice/blind_accuracy"):
        assert 0.0 <= result.eval[key] <= 100.0, key
    assert result.eval["heldout/n"] == 6
    from lmm.training.monitor import read_metrics

    evals = [r for r in read_metrics(tmp_path / "run") if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4]
