"""Global contrastive negatives (contrastive_negatives=global): 2 gloo processes, each holding part of the rows,
give the loss and the (DDP-averaged) gradients of one process holding the whole batch, rel 1e-5: for the loss
function on embeddings, for the model's contrastive loss (LoRA: the text side too) and for two trainer steps.
The rank-local variant (contrastive_negatives=rank) stays what it was: each micro-batch's own rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

ROW_SPLITS = {"uneven": [5, 3], "one_empty": [8, 0]}  # rows per rank
MODEL_SPLIT = [5, 3]
CAPTIONS = [f"a {c} disc" for c in ("red", "green", "blue", "yellow", "white", "black", "purple", "orange")]
COLOURS = [(230, 20, 20), (20, 200, 40), (30, 40, 230), (240, 230, 20), (250, 250, 250), (5, 5, 5), (140, 20, 200)]
COLOURS.append((250, 140, 0))


def embedding_case():
    """(image, text) unit vectors (8, 6) and a learnable scale, the same on every rank."""
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(8, 6, generator=g), dim=-1)
    text = F.normalize(image + 0.7 * torch.randn(8, 6, generator=g), dim=-1)
    return image, text, torch.tensor(7.0, requires_grad=True)


def lora_model(**bridge_kw):
    from lmm.config import LoraSettings
    from lmm.model import LMM
    from lmm.testing import tiny_lmm_config, tiny_tokenizer

    cfg = tiny_lmm_config(contrastive_dim=16, **bridge_kw)
    cfg.lora = LoraSettings(r=2, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(5)
    model = LMM.from_config(cfg, tokenizer=tiny_tokenizer(), device="cpu")
    with torch.no_grad():  # LoRA's B starts at 0: give the text side a gradient path of its own at step 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def pictures(order):
    from PIL import Image, ImageDraw

    out = []
    for i in order:
        im = Image.new("RGB", (32, 32), (128, 128, 128))
        ImageDraw.Draw(im).ellipse([4, 4 + i % 3, 28, 28], fill=COLOURS[i])
        out.append(im)
    return out


def pair_rows(model, order):
    """Pair rows "<image>caption<|endofchunk|>" (labels on the caption), as the data pipeline makes them."""
    from lmm.data.formats import MediaRef
    from lmm.data.packing import Encoded, collate
    from lmm.data.text import encode_document

    enc = [encode_document([MediaRef(None), CAPTIONS[i]], model.tokenizer) for i in order]
    batch = collate([Encoded(e.input_ids, e.labels) for e in enc], model.tokenizer.pad_token_id)
    batch.pop("pixel_values"), batch.pop("task_ids")
    return {**batch, "pixel_values": model.pixel_values(pictures(order))[:, None, None]}


def rank_rows(order, rank, world, split=MODEL_SPLIT):
    if world == 1:
        return list(order)
    return list(order)[sum(split[:rank]) : sum(split[: rank + 1])]


def model_batch(model, rank: int = 0, world: int = 1):
    return pair_rows(model, rank_rows(range(8), rank, world))


STEP_ORDERS = [list(range(8)), [3, 6, 0, 7, 2, 5, 1, 4]]


def trainer_batches(model, rank: int = 0, world: int = 1):
    return [pair_rows(model, rank_rows(order, rank, world)) for order in STEP_ORDERS]


# (name, distributed, with ITM): the first two must equal one process; the ITM runs (whose negatives are drawn
# per rank) must equal each other
TRAINER_RUNS = [
    ("ddp", "ddp", False),
    ("fsdp2", "fsdp2", False),
    ("ddp_itm", "ddp", True),
    ("fsdp2_itm", "fsdp2", True),
]


def train_config(root, **kw):
    from lmm.testing import tiny_train_config

    return tiny_train_config(
        Path(root), contrastive_weight=0.5, schedule={"max_steps": 2}, logging={"log_every": 1}, **kw
    )


def launch(out: Path, part: str) -> None:
    """Run tests/training/global_contrastive_worker.py on 2 gloo processes under torchrun."""
    worker = Path(__file__).with_name("global_contrastive_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    proc = subprocess.run([*cmd, str(out), part], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Each rank's losses and gradients (2-process gloo run)."""
    out = tmp_path_factory.mktemp("global")
    launch(out, "grads")
    return [load_file(out / f"rank{r}.safetensors") for r in range(2)]


@pytest.fixture(scope="module")
def two_rank_trainers(tmp_path_factory):
    """{run name: {losses, metric rows}} of the 2-process trainer runs (TRAINER_RUNS)."""
    out = tmp_path_factory.mktemp("global_trainer")
    launch(out, "trainer")
    return json.loads((out / "trainer.json").read_text())


def assert_rel(got, want, what):
    err = float((got - want).norm() / want.norm().clamp(min=1e-30))
    assert err < 1e-5, f"{what}: relative error {err:.2e}"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()), msg=what)


@pytest.mark.parametrize("name", list(ROW_SPLITS))
def test_loss_function_two_ranks_equal_one_process(two_ranks, name):
    from lmm.losses import contrastive_loss

    ranks = two_ranks
    image, text, scale = embedding_case()
    image.requires_grad_(), text.requires_grad_()
    want = contrastive_loss(image, text, scale, gather=True)  # one process: gather is the identity
    want.backward()
    assert want.item() > 0.1
    assert_rel(ranks[0][f"{name}.loss"][0], want.detach(), "loss")
    assert_rel(ranks[0][f"{name}.scale_grad"], scale.grad, "d loss / d scale")
    got_image = torch.cat([r[f"{name}.image_grad"] for r in ranks])  # each rank: the gradient of its own rows
    got_text = torch.cat([r[f"{name}.text_grad"] for r in ranks])
    assert_rel(got_image, image.grad, "d loss / d image")
    assert_rel(got_text, text.grad, "d loss / d text")
    # with rank-local negatives the two halves would be a different loss (fewer candidates): the test can fail
    halves = [contrastive_loss(image[a:b], text[a:b], scale) for a, b in ((0, 5), (5, 8))]
    if name == "uneven":
        assert abs(float(sum(halves).detach() / 2) - want.item()) > 1e-2


def test_model_contrastive_loss_and_gradients_two_ranks_equal_one_process(two_ranks):
    ranks = two_ranks
    model = lora_model()
    out = model(**model_batch(model), return_logits=False, contrastive=True, gather_negatives=True)
    out.contrastive_loss.backward()
    assert_rel(ranks[0]["model.loss"][0], out.contrastive_loss.detach(), "loss")
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    got = {k[len("model.grad.") :]: v for k, v in ranks[0].items() if k.startswith("model.grad.")}
    assert got.keys() == grads.keys()
    assert any("lora_" in n for n in grads) and any(n.startswith("resamplers.") for n in grads)
    assert any(n.startswith("contrastive.") for n in grads)
    for n, g in grads.items():
        assert_rel(got[n], g, n)


@pytest.mark.slow  # four 2-process trainer runs: about a minute on 2 shared cores
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_trainer_steps_two_ranks_equal_one_process(two_rank_trainers, tmp_path, mode):
    from lmm.testing import ListSource
    from lmm.training import Trainer
    from lmm.training.monitor import read_metrics

    dist = two_rank_trainers[mode]
    model = lora_model()
    losses = Trainer(model, train_config(tmp_path), ListSource(trainer_batches(model))).fit().losses
    assert dist["losses"] == pytest.approx(losses, rel=1e-5)
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(rows) == 2
    assert [r["loss/contrastive"] for r in dist["rows"]] == pytest.approx(
        [r["loss/contrastive"] for r in rows], rel=1e-5
    )
    assert rows[1]["loss/contrastive"] != pytest.approx(rows[0]["loss/contrastive"], rel=1e-3)  # it trained


@pytest.mark.slow
def test_fsdp2_with_itm_and_global_contrastive_takes_the_ddp_steps(two_rank_trainers):
    """ITM runs a second forward of the fused model (hard-negative pairs) inside the step; under FSDP2 its
    sharded blocks are gathered again for it, and the steps equal DDP's."""
    runs = two_rank_trainers
    assert runs["fsdp2_itm"]["losses"] == pytest.approx(runs["ddp_itm"]["losses"], rel=1e-5)
    itm = [r["loss/itm"] for r in runs["ddp_itm"]["rows"]]
    assert [r["loss/itm"] for r in runs["fsdp2_itm"]["rows"]] == pytest.approx(itm, rel=1e-5)
    assert all(v > 0 for v in itm)


def test_rank_local_negatives_are_each_micro_batchs_own_rows():
    from lmm.adapters import info_nce
    from lmm.losses import contrastive_loss

    image, text, scale = embedding_case()
    assert contrastive_loss(image, text, scale, gather=False) == info_nce(image, text, scale)
    cfg = train_config("/tmp/unused")
    assert cfg.contrastive_negatives == "global"
    assert train_config("/tmp/unused", contrastive_negatives="rank").contrastive_negatives == "rank"
