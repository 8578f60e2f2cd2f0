"""A model directory written by an earlier lmm (`save_pretrained` on 2026-11-28, before the encoder/bridge
redesign) still loads, and gives the logits it gave then."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from lmm.model import LMM

FIXTURE = Path(__file__).parent / "fixtures" / "saved-2026-11-28"


def test_directory_saved_before_the_redesign_loads_with_identical_logits():
    model = LMM.from_pretrained(FIXTURE, device="cpu").eval()
    expected = load_file(FIXTURE / "expected.safetensors")
    with torch.no_grad():
        logits = model(expected["input_ids"], pixel_values=expected["pixel_values"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
