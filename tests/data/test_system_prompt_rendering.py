"""One prompt rendering for training and inference: the training loader renders a conversation with the model's
chat template and default system prompt exactly as `model.render_chat` (what `model.chat` feeds `generate`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lmm.data import DataConfig, build_loader
from lmm.data.text import IGNORE_INDEX

QUESTION, ANSWER = "What colour is the square?", "a deep teal"


def write_conversation(tmp_path):
    Image.fromarray(np.full((32, 32, 3), 90, dtype=np.uint8)).save(tmp_path / "img.png")
    record = {
        "id": "0",
        "image": "img.png",
        "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": ANSWER}],
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps([record]))
    return path


def loader_row(model, path, image_root, system_prompt):
    cfg = DataConfig.from_dict(
        {
            "datasets": [{"path": str(path), "format": "conversation", "image_root": str(image_root)}],
            "batch_size": 1,
            "max_tokens": 256,
        }
    )
    loader = build_loader(cfg, model.tokenizer, model.image_processor, system_prompt=system_prompt)
    batch = next(iter(loader))
    keep = batch["attention_mask"][0].bool()
    return batch["input_ids"][0][keep].tolist(), batch["labels"][0][keep].tolist()


@pytest.mark.parametrize("system_prompt", ["You answer in three words.", ""])
def test_loader_tokens_equal_render_chat(tmp_path, system_prompt):
    from lmm.testing import tiny_lmm

    model = tiny_lmm()
    model.config.system_prompt = system_prompt
    path = write_conversation(tmp_path)
    ids, labels = loader_row(model, path, tmp_path, model.config.system_prompt)

    prompt, images = model.render_chat(
        [{"role": "user", "content": [{"type": "image", "image": "img.png"}, {"type": "text", "text": QUESTION}]}]
    )
    assert images == ["img.png"] and "<image>\n" + QUESTION in prompt
    prompt_ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]  # as model.chat tokenises it
    assert ids[: len(prompt_ids)] == prompt_ids  # the prompt part: identical token ids
    first_loss = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    assert first_loss == len(prompt_ids)  # the loss starts where model.chat starts generating
    answer_ids = model.tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    assert ids[len(prompt_ids) : len(prompt_ids) + len(answer_ids)] == answer_ids

    # without the model's system prompt the loader would render the template's default (a different prompt)
    bare_ids, _ = loader_row(model, path, tmp_path, None)
    assert bare_ids[: len(prompt_ids)] != prompt_ids
