"""The fallback chat templates of Qwen2.5, Qwen3, Mistral and Phi-3/Phi-4, and answer-only masks on them.

Each renders what the model's own template renders: Phi-3's and Phi-4-mini's released templates are
short enough to be the reference themselves; for Qwen2.5, Qwen3 (thinking tags) and Mistral v0.3 the
expected text is written out from their released templates. Ids go through ``transformers``'
tokenizer on the same tokenizer.json. The masks are checked where the current mask logic is exact:
each assistant answer and the token closing its turn, nothing of the prompts.
"""

from __future__ import annotations

import itertools

import pytest

from tunesmith.data import chat_templates, load_tokenizer

from test_tokenizer import CHATML_SPECIALS, build_bpe_dir  # tiny tokenizers built on the fly

transformers = pytest.importorskip("transformers")

# The released templates (tokenizer_config.json "chat_template") of microsoft/Phi-3-mini-4k-instruct
# and microsoft/Phi-4-mini-instruct, as references for our fallbacks.
PHI3_RELEASED = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI4_RELEASED = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] "
    "is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
    "'<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI_SPECIALS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
QWEN3_SPECIALS = CHATML_SPECIALS + ["<think>", "</think>"]

SYSTEM = {"role": "system", "content": "You answer in JSON."}
CONVERSATION = [
    SYSTEM,
    {"role": "user", "content": "Maria, 34, lives in Lisbon."},
    {"role": "assistant", "content": '{"name": "Maria", "age": 34}'},
    {"role": "user", "content": "And Tom, 27?"},
    {"role": "assistant", "content": '{"name": "Tom", "age": 27}'},
]


def tokenizer_for(kind: str, tmp_path):
    """A tiny tokenizer with the family's special tokens and its fallback template."""
    specials, bos, eos = {
        "qwen2_5": (CHATML_SPECIALS, None, "<|im_end|>"), "qwen3": (QWEN3_SPECIALS, None, "<|im_end|>"),
        "mistral": (MISTRAL_SPECIALS, "<s>", "</s>"), "phi3": (PHI_SPECIALS, "<s>", "<|endoftext|>"),
        "phi4": (PHI_SPECIALS, None, "<|endoftext|>"),
    }[kind]
    path = build_bpe_dir(tmp_path / kind, specials, bos, eos, chat_templates.get(kind))
    return load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("kind", ["qwen2_5", "qwen3", "mistral", "phi3", "phi4"])
def test_render_and_ids_match_transformers(kind, tmp_path):
    ours, ref = tokenizer_for(kind, tmp_path)
    for messages, gen in [(CONVERSATION, False), (CONVERSATION[:-1], True), (CONVERSATION[:2], True)]:
        assert ours.render_chat(messages, add_generation_prompt=gen) == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == ref.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=gen, return_dict=False)


@pytest.mark.parametrize("kind,released", [("phi3", PHI3_RELEASED), ("phi4", PHI4_RELEASED)])
def test_phi_fallbacks_render_like_the_released_templates(kind, released, tmp_path):
    ours, _ = tokenizer_for(kind, tmp_path)
    for messages, gen in [(CONVERSATION, False), (CONVERSATION[:-1], True), (CONVERSATION[1:3], False)]:
        expected = ours.render_chat(messages, add_generation_prompt=gen)
        ours.chat_template = released
        assert ours.render_chat(messages, add_generation_prompt=gen) == expected
        ours.chat_template = chat_templates.get(kind)


def test_qwen2_5_adds_its_default_system_prompt(tmp_path):
    ours, _ = tokenizer_for("qwen2_5", tmp_path)
    assert ours.render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert ours.render_chat(CONVERSATION[:3]).startswith("<|im_start|>system\nYou answer in JSON.<|im_end|>\n<|im_start|>user")


def test_qwen3_keeps_reasoning_only_after_the_last_question(tmp_path):
    ours, _ = tokenizer_for("qwen3", tmp_path)
    conversation = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "<think>\nadd again\n</think>\n\n6"},
    ]
    assert ours.render_chat(conversation) == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"  # earlier reasoning dropped
        "<|im_start|>user\n3+3?<|im_end|>\n<|im_start|>assistant\n<think>\nadd again\n</think>\n\n6<|im_end|>\n")
    # A final answer without reasoning still gets an (empty) think block; no system prompt by default.
    assert ours.render_chat(conversation[:1] + [{"role": "assistant", "content": "4"}]) == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>\n")
    assert ours.render_chat(conversation[:1], add_generation_prompt=True) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert ours.render_chat(conversation[:1], add_generation_prompt=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_mistral_inst_format(tmp_path):
    ours, _ = tokenizer_for("mistral", tmp_path)
    assert ours.render_chat(CONVERSATION) == (
        "<s>[INST] You answer in JSON.\n\nMaria, 34, lives in Lisbon.[/INST] {\"name\": \"Maria\", \"age\": 34}</s>"
        "[INST] And Tom, 27?[/INST] {\"name\": \"Tom\", \"age\": 27}</s>")


def mask_runs(ids: list[int], mask: list[bool]) -> list[list[int]]:
    """The masked ids, one list per contiguous run."""
    return [[i for i, _ in run] for keep, run in itertools.groupby(zip(ids, mask), key=lambda pair: pair[1]) if keep]


@pytest.mark.parametrize("kind,stop", [("qwen2_5", "<|im_end|>"), ("qwen3", "<|im_end|>"), ("mistral", "</s>"),
                                       ("phi3", "<|end|>"), ("phi4", "<|end|>")])
def test_answer_mask_is_each_answer_and_its_closing_token(kind, stop, tmp_path):
    tok, _ = tokenizer_for(kind, tmp_path)
    ids, mask = tok.tokenize_messages(CONVERSATION)
    assert ids == tok.apply_chat_template(CONVERSATION)
    assert tok.token_to_id(stop) in tok.stop_ids  # generation stops at the end of a turn
    runs = mask_runs(ids, mask)
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers):
        assert run[-1] == tok.token_to_id(stop)
        assert answer in tok.decode(run[:-1], skip_special_tokens=False)
    unmasked = tok.decode([i for i, k in zip(ids, mask) if not k], skip_special_tokens=False)
    assert all(m["content"] in unmasked for m in CONVERSATION if m["role"] != "assistant")
