"""Shared fixtures: a tiny random Llama saved in the Hugging Face layout, with a real tokenizer.

Recipe tests run end to end on it in seconds. It is built by ``transformers`` (the reference), so
loading it also exercises our HF reader.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = "red green blue cat dog fish one two three four five apple pear plum tree river stone cloud".split()


def make_tokenizer_dir(path: Path) -> int:
    """Train a small byte-level BPE with ChatML specials; write tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(random.Random(i).choices(WORDS, k=12)) for i in range(300)]
    corpus += ["Repeat the words twice.", "Reverse the words.", "system user assistant", "0123456789 {}[]\":,"]
    tok.train_from_iterator(corpus, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "add_bos_token": False, "chat_template": CHATML, "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }))
    return tok.get_vocab_size()


def make_records(n: int, seed: int) -> list[dict]:
    """A learnable task: repeat the given words twice."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = " ".join(rng.choices(WORDS, k=rng.randint(2, 4)))
        out.append({"instruction": "Repeat the words twice.", "input": words, "output": f"{words} {words}"})
    return out


def save_hf_llama(path: Path, seed: int = 0, **config: Any) -> Path:
    """A random 2-layer Llama built by ``transformers`` in ``path`` with the test tokenizer, its weights
    drawn from ``seed``; ``config`` overrides its ``LlamaConfig`` fields."""
    import transformers

    vocab = make_tokenizer_dir(path)
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=2, pad_token_id=0,
    )
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**fields, **config})).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """An HF-layout folder: config.json, model.safetensors, tokenizer files (a random 2-layer Llama)."""
    return save_hf_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """Train and held-out JSONL files for the repeat-twice task."""
    from recipe_helpers import write_splits

    return write_splits(tmp_path_factory.mktemp("tiny_data"), make_records)


@pytest.fixture(scope="session")
def tiny_pref_data(tmp_path_factory) -> dict[str, Path]:
    """Train and held-out JSONL preference pairs (repeat twice ≻ say once, reversed)."""
    from recipe_helpers import make_pairs, write_splits

    return write_splits(tmp_path_factory.mktemp("tiny_pref_data"), make_pairs)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    """Another random Llama of ``tiny_llama_dir``'s shape and tokenizer (other weights): a distillation teacher."""
    return save_hf_llama(tmp_path_factory.mktemp("tiny_teacher"), seed=1)


@pytest.fixture(scope="session")
def tiny_prompt_data(tmp_path_factory) -> dict[str, Path]:
    """Train and held-out JSONL prompt records (GRPO) with an ``answer`` column."""
    from recipe_helpers import make_prompts, write_splits

    return write_splits(tmp_path_factory.mktemp("tiny_prompt_data"), make_prompts)
