"""The next-token loss: sparse (labelled positions only) and dense (no host sync, for torch.compile) agree with
a plain full-logits cross-entropy, values and gradients, also when chunked."""

import pytest
import torch
import torch.nn.functional as F

from lmm.losses import next_token_losses


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("chunk", [3, 4096])
def test_next_token_losses_equal_plain_cross_entropy(sparse, chunk):
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 11)
    hidden = torch.randn(2, 7, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[0, :4] = -100  # prompt tokens carry no loss
    loss, per_token = next_token_losses(head, hidden, labels, chunk=chunk, sparse=sparse)
    loss.backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    ref_tok = F.cross_entropy(
        head(hidden[:, :-1]).reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none"
    ).view(2, 6)
    ref = ref_tok.sum() / (labels[:, 1:] != -100).sum()
    ref.backward()
    torch.testing.assert_close(per_token, ref_tok)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, hidden.grad)
