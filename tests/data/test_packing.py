"""Packed rows: layout of the batch contract, and equality with running each sample alone."""

import pytest
import torch

from lmm.data.encode import SampleEncoder
from lmm.data.formats import MediaRef, Sample
from lmm.data.packing import collate, collate_packed, fits


def make_samples(tokenizer, transform, img):
    enc = SampleEncoder(tokenizer, transform, max_tokens=64)
    docs = [
        Sample("a", "document", parts=[MediaRef(img.bytes(0)), "a red circle"]),
        Sample("b", "document", parts=["intro", MediaRef(img.bytes(1)), "one", MediaRef(img.bytes(2)), "two"]),
        Sample(
            "c",
            "conversation",
            messages=[{"role": "user", "content": "<image>\nwhat shape?"}, {"role": "assistant", "content": "circle"}],
            media=[MediaRef(img.bytes(3))],
        ),
        Sample("d", "document", parts=[MediaRef(img.bytes(4)), "blue square"]),
    ]
    return [enc.encode(*enc.decode(s), task=i % 2) for i, s in enumerate(docs)]


def test_packed_layout(tokenizer, transform, img):
    s = make_samples(tokenizer, transform, img)
    rows = [[s[0], s[1]], [s[2], s[3]]]
    T = 64
    batch = collate_packed(rows, tokenizer.pad_token_id, T, (3, 32, 32))
    assert batch["pixel_values"].shape == (2, 3, 1, 3, 32, 32)
    assert "frame_mask" not in batch
    for b, row in enumerate(rows):
        start = 0
        media = [m for x in row for m in x.media]
        for seg, x in enumerate(row):
            n = len(x)
            sl = slice(start, start + n)
            assert batch["input_ids"][b, sl].tolist() == x.input_ids
            assert batch["labels"][b, sl].tolist() == x.labels
            assert batch["position_ids"][b, sl].tolist() == list(range(n))
            assert set(batch["segment_ids"][b, sl].tolist()) == {seg}
            assert set(batch["task_ids"][b, sl].tolist()) == {x.task}
            start += n
        assert batch["attention_mask"][b].tolist() == [1] * start + [0] * (T - start)
        assert set(batch["segment_ids"][b, start:].tolist()) == {len(row)}  # padding: its own segment
        assert (batch["labels"][b, start:] == -100).all()
        for k, m in enumerate(media):  # k-th <image> of the row <-> pixel_values[b, k]
            assert torch.equal(batch["pixel_values"][b, k], m)
    assert batch["pixel_values"][1, 2].abs().sum() == 0  # row 1 has only 2 media


def test_fits_respects_length_and_media_limits(tokenizer, transform, img):
    s = make_samples(tokenizer, transform, img)
    assert fits([s[0]], s[1], len(s[0]) + len(s[1]))
    assert not fits([s[0]], s[1], len(s[0]) + len(s[1]) - 1)
    assert not fits([s[0]], s[1], 1000, max_media=2)


@pytest.mark.parametrize("bridge", ["flamingo", "projector"])
def test_packed_logits_equal_one_by_one(bridge, transform, img):
    lmm_testing = pytest.importorskip("lmm.testing")
    try:
        model = (
            lmm_testing.tiny_lmm(bridge=bridge, gates=0.5)
            if bridge == "flamingo"
            else lmm_testing.tiny_lmm(bridge=bridge)
        )
    except ImportError as e:  # lmm.model not written yet
        pytest.skip(f"lmm.model unavailable: {e}")
    model.eval()
    tok = model.tokenizer
    s = make_samples(tok, transform, img)
    packed = collate_packed([[s[0], s[1]], [s[2], s[3]]], tok.pad_token_id, 64, (3, 32, 32))

    def labelled_logits(out, labels, b):
        """Logits at the positions that carry a label (projector bridges expand <image> into several slots)."""
        lab = out.labels if out.labels is not None else labels
        keep = lab[b] != -100
        return out.logits[b][keep], lab[b][keep]

    rows = [[0, 1], [2, 3]]
    with torch.no_grad():
        out = model(**{k: v for k, v in packed.items() if k != "task_ids"})
        total_loss, total_tokens = 0.0, 0
        for b, row in enumerate(rows):
            ref_logits, ref_labels = [], []
            for i in row:
                single = collate([s[i]], tok.pad_token_id, (3, 32, 32))
                ref = model(**{k: v for k, v in single.items() if k != "task_ids"})
                logits, labels = labelled_logits(ref, single["labels"], 0)
                ref_logits.append(logits)
                ref_labels.append(labels)
                k = int((single["labels"][0, 1:] != -100).sum())
                total_loss += float(ref.loss) * k
                total_tokens += k
            logits, labels = labelled_logits(out, packed["labels"], b)
            assert labels.tolist() == torch.cat(ref_labels).tolist()  # labels line up
            torch.testing.assert_close(logits, torch.cat(ref_logits), atol=1e-5, rtol=1e-5)
    assert int((packed["labels"][:, 1:] != -100).sum()) == total_tokens
    assert float(out.loss) == pytest.approx(total_loss / total_tokens, rel=1e-5)
    # the gates are open, so the images matter: a different image changes the logits
    if bridge == "flamingo":
        other = dict(packed, pixel_values=packed["pixel_values"].flip(1))
        with torch.no_grad():
            assert not torch.allclose(model(**{k: v for k, v in other.items() if k != "task_ids"}).logits, out.logits)
