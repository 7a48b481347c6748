"""Chunked per-token log-probs (DPO, GRPO) equal the unchunked ones, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunesmith.models import apply_lora
from tunesmith.models.llama import Llama, LlamaConfig
from tunesmith.training.losses import frozen_linear_head
from tunesmith.training.preference import sequence_logprobs

TINY = LlamaConfig(vocab_size=97, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=48)


def _setup(full: bool):
    torch.manual_seed(0)
    model = Llama(TINY)
    if full:
        model.requires_grad_(True)
    else:
        apply_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4.0)
    tokens = torch.randint(0, TINY.vocab_size, (4, 12))
    labels = torch.randint(0, TINY.vocab_size, (4, 12))
    labels[:, :3] = -100  # prompts
    labels[1, 9:] = -100  # padding
    return model, tokens, labels


def _reference(hidden, labels, head):
    """The unchunked formula: every labelled position's logits at once, log-softmax, sum per row."""
    keep = labels != -100
    token = F.log_softmax(head(hidden[keep]).float(), dim=-1).gather(1, labels[keep][:, None]).squeeze(1)
    return torch.zeros(labels.shape[0]).index_add(0, keep.nonzero()[:, 0], token)


@pytest.mark.parametrize("full", [False, True], ids=["lora_frozen_head", "trained_head"])
@pytest.mark.parametrize("chunk", [5, 256])
def test_chunked_sequence_logprobs_match_values_and_gradients(full, chunk):
    model, tokens, labels = _setup(full)
    assert (frozen_linear_head(model.logits) is None) == full  # both paths are exercised
    weights = torch.randn(4)
    grads = []
    for chunk_size, fn in ((chunk, None), (0, _reference)):
        model.zero_grad(set_to_none=True)
        hidden = model.hidden_states(tokens)
        if fn is None:
            logps, counts = sequence_logprobs(hidden, labels, model.logits, chunk_size=chunk_size)
            assert counts.tolist() == (labels != -100).sum(1).float().tolist()
        else:
            logps = fn(hidden, labels, model.logits)
        (logps * weights).sum().backward()
        grads.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (chunked, g_chunked), (whole, g_whole) = grads
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-5)
    assert g_chunked.keys() == g_whole.keys() and g_chunked
    for name in g_whole:
        torch.testing.assert_close(g_chunked[name], g_whole[name], rtol=1e-5, atol=1e-6, msg=name)


def test_no_grad_chunks_match_and_keep_no_graph():
    model, tokens, labels = _setup(False)
    with torch.no_grad():
        hidden = model.hidden_states(tokens)
        chunked, _ = sequence_logprobs(hidden, labels, model.logits, chunk_size=4)
        whole = _reference(hidden, labels, model.logits)
    assert not chunked.requires_grad
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-5)
