"""Merged folders that stand alone: tokenizer files copied from a base folder carry the run's chat template,
and generation_config.json gains the end-of-turn tokens. (GGUF bases: test_export_smollm2.py and
test_export_gemma3_270m.py.)"""

from __future__ import annotations

import json
import shutil

import pytest

transformers = pytest.importorskip("transformers")

from export_helpers import assert_same_tokenizer  # noqa: E402

from tunesmith.data import chat_templates, load_tokenizer  # noqa: E402
from tunesmith.data.tokenizer_files import write_tokenizer_files  # noqa: E402

def test_copied_from_a_folder_with_the_runs_chat_template_and_stop_tokens(tiny_llama_dir, tmp_path):
    source, out = tmp_path / "base", tmp_path / "merged"
    shutil.copytree(tiny_llama_dir, source)
    (source / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, "temperature": 0.7}))
    tok = load_tokenizer(str(source))
    tok.chat_template = chat_templates.get("chatml") + "{# replaced by the run #}"
    out.mkdir()
    write_tokenizer_files(tok, out, source_dir=source)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert_same_tokenizer(hf, tok, transformers.AutoTokenizer.from_pretrained(source))
    assert hf.chat_template == tok.chat_template
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["temperature"] == 0.7 and gen["eos_token_id"] == [0, tok.token_to_id("<|im_end|>")]
