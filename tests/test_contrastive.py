"""Image-text contrastive objective (bridge.contrastive_dim, contrastive_weight): what it compares, that it
learns retrieval, that the trainer weighs and logs it, that it saves, and the configuration errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmm.config import ConfigError
from lmm.testing import DISC_COLOURS as COLOURS
from lmm.testing import ListSource, pair_batch, tiny_lmm, tiny_train_config
from lmm.testing import disc_pictures as pictures


def test_loss_is_info_nce_of_pooled_media_and_the_lms_own_text_only_states():
    model = tiny_lmm(gates=1.0, seed=2, contrastive_dim=16)  # 4 layers, cross-attention before 0 and 2
    images, captions = pictures()[:4], [f"a {c} disc" for c in list(COLOURS)[:4]]
    batch = pair_batch(model, images, captions)
    out = model(**batch, contrastive=True)
    with torch.no_grad():
        # reference text side: the decoder's own hidden_states[2] (entering its middle layer) without any media
        text = model.lm.base_model(
            inputs_embeds=model.embed(batch["input_ids"]),
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
        ).hidden_states[2]
        real = batch["attention_mask"].bool()  # (right padding: the pads' position ids differ, and never count)
        got = model.contrastive_text_states(batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(got[real], text[real])
        media = model.encode_media(batch["pixel_values"])  # (B, 1, L, D)
        head = model.contrastive
        pooled_txt = torch.stack([text[b][batch["labels"][b] != -100].mean(0) for b in range(4)])
        img = F.normalize(head.media_proj(head.media_norm(media.mean((1, 2)))), dim=-1)
        txt = F.normalize(head.text_proj(head.text_norm(pooled_txt)), dim=-1)
        logits = math.exp(head.log_scale.item()) * img @ txt.t()
        want = -(logits.log_softmax(1).diagonal().mean() + logits.log_softmax(0).diagonal().mean()) / 2
    torch.testing.assert_close(out.contrastive_loss, want, atol=1e-5, rtol=1e-5)
    assert model(**batch).contrastive_loss is None  # only computed when asked


def test_text_embeddings_read_word_order():
    """A middle layer's states are contextual: not a bag of word embeddings."""
    from lmm.retrieval import text_embeddings

    model = tiny_lmm(seed=2, contrastive_dim=16)
    a, b = text_embeddings(model, ["a dog bites a man", "a man bites a dog"])
    assert not torch.allclose(a, b, atol=1e-4)


def test_training_on_it_learns_image_text_retrieval():
    torch.manual_seed(0)
    model = tiny_lmm(seed=4, contrastive_dim=32)
    images, captions = pictures(), [f"a {c} disc" for c in COLOURS]
    before = model.similarity(images, captions).argmax(1)
    batch = pair_batch(model, images, captions)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(**batch, return_logits=False, contrastive=True).contrastive_loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    after = model.similarity(images, captions)
    assert after.shape == (8, 8)
    assert after.argmax(1).tolist() == list(range(8)), (before.tolist(), after.argmax(1).tolist())
    assert after.argmax(0).tolist() == list(range(8))  # and text -> image retrieval
    assert float(loss.detach()) < 0.1


def test_trainer_adds_the_weighted_loss_and_logs_it(tmp_path):
    from lmm.training import Trainer

    model = tiny_lmm(seed=1, contrastive_dim=16)
    batch = pair_batch(model, pictures()[:4], [f"a {c} disc" for c in list(COLOURS)[:4]])
    with torch.no_grad():
        out = model(**batch, return_logits=False, contrastive=True)
    cfg = tiny_train_config(tmp_path, contrastive_weight=0.5, schedule={"max_steps": 1})
    trainer = Trainer(model, cfg, ListSource([batch]))
    result = trainer.fit()
    assert result.losses[0] == pytest.approx(float(out.loss) + 0.5 * float(out.contrastive_loss), rel=1e-5)
    logged = [r for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"step": 1' in r]
    assert logged and '"loss/contrastive"' in logged[0]


def test_saved_and_reloaded_model_keeps_the_head(tmp_path):
    from lmm.model import LMM

    model = tiny_lmm(seed=3, contrastive_dim=16)
    model.save_pretrained(tmp_path / "m")
    again = LMM.from_pretrained(tmp_path / "m", device="cpu")
    ims, texts = pictures()[:3], ["a red disc", "a green disc", "a blue disc"]
    assert torch.equal(model.similarity(ims, texts), again.similarity(ims, texts))


def test_configuration_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="flamingo"):
        tiny_lmm(bridge="projector", contrastive_dim=16)
    with pytest.raises(ValueError, match="contrastive_dim"):
        tiny_lmm().similarity(pictures()[:1], ["a red disc"])
    from lmm.testing import tiny_lmm_config
    from lmm.training import Trainer

    cfg = tiny_train_config(tmp_path, contrastive_weight=1.0, model=tiny_lmm_config().to_dict())
    with pytest.raises(ConfigError, match="bridge.contrastive_dim"):
        cfg.validate()
    with pytest.raises(ConfigError, match="packing"):
        tiny_train_config(tmp_path, contrastive_weight=1.0, data={"packing": True}, preset="lmm-tiny").validate()
    for bad, match in [
        ({"frozen_cache": True}, "frozen_cache"),
        ({"data": {"batch_size": 1}}, "2 rows"),
    ]:
        with pytest.raises(ConfigError, match=match):
            tiny_train_config(tmp_path, contrastive_weight=1.0, preset="lmm-tiny", **bad).validate(world_size=1)
    # FSDP2 takes the DDP steps (tests/training/test_global_contrastive.py)
    tiny_train_config(tmp_path, contrastive_weight=1.0, preset="lmm-tiny", distributed="fsdp2").validate_model()
    with pytest.raises(ConfigError, match="bridge.contrastive_dim=256"):
        Trainer(tiny_lmm(), tiny_train_config(tmp_path, contrastive_weight=1.0), ListSource([]))
