"""BLIP-2's Q-Former: the three attention masks entry by entry, each stage-1 loss against a hand computation,
and BERT initialisation (the text side under the uni-modal mask is exactly the BERT it came from)."""

import math

import pytest
import torch

from lmm.adapters.qformer import BertQFormer, qformer_mask
from lmm.adapters.qformer_objectives import hard_negatives, itc_loss, itc_similarities, itg_loss, itm_loss

# 3 queries + 4 text tokens, the last text token padding
TEXT_MASK = torch.tensor([[1, 1, 1, 0]])


def rows(*lines):
    return torch.tensor([[c == "1" for c in line.replace(" ", "")] for line in lines])


def test_unimodal_mask_itc():
    """Queries see queries, text sees text (not padding), neither sees the other."""
    want = rows(
        "111 0000",
        "111 0000",
        "111 0000",
        "000 1110",
        "000 1110",
        "000 1110",
        "000 1110",  # a padding query row still reads the real text
    )
    assert torch.equal(qformer_mask(3, TEXT_MASK, "unimodal")[0], want)


def test_bidirectional_mask_itm():
    want = rows(*["111 1110"] * 7)
    assert torch.equal(qformer_mask(3, TEXT_MASK, "bidirectional")[0], want)


def test_multimodal_causal_mask_itg():
    """Queries see queries only; text sees every query and the text up to itself."""
    want = rows(
        "111 0000",
        "111 0000",
        "111 0000",
        "111 1000",
        "111 1100",
        "111 1110",
        "111 1110",  # padding: its own key is padding
    )
    assert torch.equal(qformer_mask(3, TEXT_MASK, "causal")[0], want)
    with pytest.raises(ValueError, match="mode must be one of"):
        qformer_mask(3, TEXT_MASK, "full")


def _ce(logits, target, eps=0.0):
    """Cross-entropy with label smoothing, by hand: (1 - eps) * -log p[target] + eps * mean_k -log p[k]."""
    z = [math.exp(v) for v in logits]
    logp = [math.log(v / sum(z)) for v in z]
    return (1 - eps) * -logp[target] + eps * -sum(logp) / len(logp)


def test_itc_loss_matches_hand_computation():
    s = 1 / math.sqrt(2)
    img = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[s, s], [-s, s]]])  # (B=2, Q=2, E=2), unit rows
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    temp = 0.5
    sim_i2t, sim_t2i = itc_similarities(img, txt, temp)
    # image 0: max(1, 0) with text 0, max(0, 1) with text 1; image 1: max(s, -s), max(s, s)
    want = torch.tensor([[1.0, 1.0], [s, s]]) / temp
    torch.testing.assert_close(sim_i2t, want)
    torch.testing.assert_close(sim_t2i, want.t())
    for eps in (0.0, 0.1):
        by_hand = (
            sum(_ce(want[i].tolist(), i, eps) for i in range(2)) / 2
            + sum(_ce(want[:, i].tolist(), i, eps) for i in range(2)) / 2
        ) / 2
        assert itc_loss(sim_i2t, sim_t2i, eps).item() == pytest.approx(by_hand, rel=1e-6)


def test_itm_loss_matches_hand_computation():
    logits = torch.tensor([[0.2, 1.5], [2.0, -1.0], [0.0, 0.3]])
    matched = torch.tensor([1, 0, 0])
    by_hand = sum(_ce(logits[i].tolist(), int(matched[i])) for i in range(3)) / 3
    assert itm_loss(logits, matched).item() == pytest.approx(by_hand, rel=1e-6)


def test_itg_loss_matches_hand_computation():
    logits = torch.tensor([[[0.1, 0.5, -0.3], [1.0, 0.0, 0.2], [0.3, 0.3, 2.0], [5.0, 0.0, 0.0]]])  # (1, L=4, V=3)
    ids = torch.tensor([[0, 2, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 0]])  # the last token is padding: no target
    for eps in (0.0, 0.1):
        by_hand = (_ce(logits[0, 0].tolist(), 2, eps) + _ce(logits[0, 1].tolist(), 1, eps)) / 2
        assert itg_loss(logits, ids, mask, eps).item() == pytest.approx(by_hand, rel=1e-6)


def test_hard_negatives_follow_the_similarities_and_skip_positives():
    sim = torch.tensor([[9.0, 50.0, 0.0, 0.0], [0.0, 9.0, 0.0, 50.0], [50.0, 0.0, 9.0, 0.0], [0.0, 0.0, 50.0, 9.0]])
    neg_img, neg_txt = hard_negatives(sim, sim.t())
    assert neg_txt.tolist() == [1, 3, 0, 2]  # per image: the most similar wrong text
    assert neg_img.tolist() == [2, 0, 3, 1]  # per text: the most similar wrong image
    g = torch.Generator().manual_seed(0)
    same = torch.zeros(4, 4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True  # texts 0 and 1 are the same caption: never each other's negative
    for _ in range(20):
        _, neg_txt = hard_negatives(sim, sim.t(), g, same=same)
        assert neg_txt[0].item() in (2, 3) and neg_txt[1].item() in (2, 3)
    all_same = ~torch.eye(3, dtype=torch.bool)  # nothing is a true negative: still a draw, never the pair itself
    a, b = hard_negatives(torch.zeros(3, 3), torch.zeros(3, 3), g, same=all_same)
    assert (a != torch.arange(3)).all() and (b != torch.arange(3)).all()
    flat = torch.zeros(5, 5)
    for _ in range(20):
        a, b = hard_negatives(flat, flat, g)
        assert (a != torch.arange(5)).all() and (b != torch.arange(5)).all()  # never the pair itself


def test_query_path_shapes_and_text_free_stage2_forward():
    torch.manual_seed(0)
    qf = BertQFormer(24, lm_dim=40, num_queries=3, depth=2, hidden=16, heads=2, intermediate=32, vocab_size=0)
    out = qf(torch.randn(2, 2, 1, 5, 24))
    assert out.shape == (2, 2, 3, 40)
    with pytest.raises(ValueError, match="no text side"):
        qf.encode(torch.randn(1, 1, 5, 24), torch.ones(1, 3, dtype=torch.long))


def test_text_side_is_exactly_the_bert_it_was_initialised_from(tmp_path):
    from transformers import BertConfig, BertForPreTraining, BertModel, BertTokenizerFast

    from lmm.adapters.qformer_objectives import Stage1Heads
    from lmm.blip2 import DEC_TOKEN, build_qformer, load_bert_weights, qformer_tokenizer
    from lmm.config import QFormerConfig

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "photo", "of"]
    # a bert-base-uncased style folder: tokenizer, config.json, model.safetensors (with the cls.* heads)
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(tmp_path)
    cfg = BertConfig(
        vocab_size=len(words),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    BertForPreTraining(cfg).save_pretrained(tmp_path)
    bert = BertModel.from_pretrained(tmp_path).eval()

    tok = qformer_tokenizer(str(tmp_path))
    assert tok.bos_token == DEC_TOKEN and len(tok) == len(words) + 1
    enc = tok(["a red circle", "a photo of a blue square"], padding=True, return_tensors="pt")
    q = QFormerConfig(variant="blip2", num_queries=3, cross_every=2, max_text_len=16, bert_path=str(tmp_path))
    qf = build_qformer(q, media_dim=8, vocab_size=len(tok)).eval()
    assert len(qf.layers) == 2 and qf.layers[1].crossattention is None  # BERT's depth; cross every other layer
    heads = Stage1Heads(16, 8, len(tok))
    assert load_bert_weights(qf, tmp_path, heads) > 0
    with torch.no_grad():
        ours = qf.encode(torch.randn(2, 1, 5, 8), enc.input_ids, enc.attention_mask, "unimodal")[:, 3:]
        theirs = bert(enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    real = enc.attention_mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)
    l0 = qf.layers[0]
    assert torch.equal(l0.ffn_query.dense_in.weight, l0.ffn.dense_in.weight)  # query FFN starts as BERT's
    stage2 = build_qformer(q, media_dim=8, lm_dim=24)  # the query path alone (stage 2 without stage 1)
    assert load_bert_weights(stage2, tmp_path) > 0 and stage2.word_embeddings is None
    assert torch.equal(stage2.layers[1].attention.query.weight, bert.encoder.layer[1].attention.self.query.weight)
    assert torch.equal(stage2.layers[0].ffn_query.dense_out.weight, bert.encoder.layer[0].output.dense.weight)


def test_caption_tokenizer_is_the_same_on_every_build_and_bert_shaped():
    """Without a BERT folder the stage-1 tokenizer is built from the captions: the same captions in any order give
    the same ids (the tokenizers trainer did not: ties went by hash order), BERT's [CLS] ... [SEP] layout, and a
    word beyond the vocabulary spelled in ## pieces rather than lost."""
    from lmm.blip2 import DEC_TOKEN, qformer_tokenizer

    caps = ["a red circle", "a blue square", "a red square", "A green Triangle.", "a blue circle"]
    one, two = qformer_tokenizer(texts=caps, vocab_size=40), qformer_tokenizer(texts=caps[::-1], vocab_size=40)
    assert one.get_vocab() == two.get_vocab()
    enc = one(["a red circle", "a red tribe"]).input_ids  # "tribe": unseen, its letters seen
    assert enc == two(["a red circle", "a red tribe"]).input_ids
    assert one.convert_ids_to_tokens(enc[0]) == ["[CLS]", "a", "red", "circle", "[SEP]"]
    assert one.bos_token == DEC_TOKEN and one.pad_token_id == 0
    assert one.convert_ids_to_tokens(enc[1])[1:-1] == ["a", "red", "t", "##r", "##i", "##b", "##e"]
    assert one.decode(enc[1], skip_special_tokens=True) == "a red tribe"
