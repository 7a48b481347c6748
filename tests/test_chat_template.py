"""Chat templates render and tokenize exactly as transformers' apply_chat_template, and the
answer-only loss mask covers exactly the assistant content plus the token that closes its turn."""

from __future__ import annotations

import pytest

from tunesmith.data import chat_templates, load_tokenizer
from tunesmith.data.tokenizer import TemplateError

from test_tokenizer import (  # tiny tokenizers built on the fly (tests/ is on sys.path under pytest)
    CHATML_SPECIALS,
    GEMMA_SPECIALS,
    GEMMA_TEMPLATE,
    LLAMA3_SPECIALS,
    SMOLLM_CHATML,
    build_bpe_dir,
    build_spm_dir,
)

transformers = pytest.importorskip("transformers")

CONVERSATION = [
    {"role": "system", "content": "You answer in JSON."},
    {"role": "user", "content": "Maria, 34, recently moved to Lisbon."},
    {"role": "assistant", "content": '{"name": "Maria", "age": 34, "city": "Lisbon"}'},
    {"role": "user", "content": "And: In Oslo lives a 27-year-old named Tom. ünïcode 🙂"},
    {"role": "assistant", "content": "Sure!\n  {\"name\": \"Tom\"}\tdone"},
]


@pytest.fixture(scope="module", params=["chatml", "llama3", "llama2", "gemma"])
def tokenizer_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "chatml":
        return request.param, build_bpe_dir(d, CHATML_SPECIALS, "<|im_start|>", "<|im_end|>", SMOLLM_CHATML)
    if request.param == "llama3":
        return request.param, build_bpe_dir(d, LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>",
                                            chat_templates.get("llama3"), bos_post_processor=True)
    if request.param == "gemma":
        return request.param, build_bpe_dir(d, GEMMA_SPECIALS, "<bos>", "<eos>", GEMMA_TEMPLATE, bos_post_processor=True)
    return request.param, build_spm_dir(d)  # Llama 2: SentencePiece with the [INST] template


def masked_runs(ids: list[int], mask: list[bool]) -> list[list[int]]:
    """The masked tokens as contiguous runs: one per trained assistant turn."""
    runs, current = [], []
    for i, keep in zip(ids, mask):
        if keep:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def _conversation(kind):
    # Llama 2's template has no room for a system turn after the first and needs user/assistant alternation.
    return CONVERSATION if kind != "gemma" else [m for m in CONVERSATION if m["role"] != "system"]


def test_render_and_ids_match_transformers(tokenizer_dir):
    kind, path = tokenizer_dir
    ours, ref = load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
    conv = _conversation(kind)
    for messages, gen in [(conv, False), (conv[:-1], True), (conv[:2], True)]:
        text = ours.render_chat(messages, add_generation_prompt=gen)
        assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == ref.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=gen, return_dict=False)


def test_loss_mask_covers_exactly_the_assistant_turns(tokenizer_dir):
    kind, path = tokenizer_dir
    tok = load_tokenizer(path)
    conv = _conversation(kind)
    ids, mask = tok.tokenize_messages(conv)
    assert ids == tok.apply_chat_template(conv) and len(mask) == len(ids)

    runs = masked_runs(ids, mask)
    answers = [m["content"] for m in conv if m["role"] == "assistant"]
    assert len(runs) == len(answers)
    stops = set(tok.stop_ids)
    for run, answer in zip(runs, answers):
        assert run[-1] in stops, "the end-of-turn token closes every trained span"
        assert not any(i in stops for i in run[:-1])
        # Llama 2 / Gemma templates trim the content; the text itself must be exactly the answer.
        expected = answer.strip() if kind in ("llama2", "gemma", "llama3") else answer
        assert tok.decode(run[:-1], skip_special_tokens=False).strip() == expected.strip()
        assert expected in tok.decode(run[:-1], skip_special_tokens=False)
    # Nothing of the system/user turns is kept: the unmasked text holds all prompts.
    unmasked = tok.decode([i for i, k in zip(ids, mask) if not k], skip_special_tokens=False)
    for m in conv:
        if m["role"] != "assistant":
            assert m["content"].strip() in unmasked


def test_train_on_all_keeps_every_token(tokenizer_dir):
    kind, path = tokenizer_dir
    tok = load_tokenizer(path)
    ids, mask = tok.tokenize_messages(_conversation(kind), train_on="all")
    assert all(mask) and len(ids) == len(mask)
    with pytest.raises(ValueError, match="train_on"):
        tok.tokenize_messages(_conversation(kind), train_on="user")


def test_template_exception_and_missing_template(tmp_path):
    tok = load_tokenizer(build_spm_dir(tmp_path))  # Llama 2 template requires user/assistant alternation
    with pytest.raises(TemplateError, match="alternating"):
        tok.render_chat([{"role": "assistant", "content": "hi"}])
    bare = load_tokenizer(build_bpe_dir(tmp_path / "bare", CHATML_SPECIALS, "<|im_start|>", "<|im_end|>", None))
    with pytest.raises(ValueError, match="no chat template"):
        bare.render_chat([{"role": "user", "content": "hi"}])
    bare.chat_template = chat_templates.get("chatml")  # explicit fallback by name
    assert bare.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="unknown chat template"):
        chat_templates.get("vicuna")


def test_template_helpers_like_transformers(tmp_path):
    template = ("{{ strftime_now('%Y') | length }}|{{ messages | tojson }}|"
                "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m['content'] }}{% endfor %}")
    path = build_bpe_dir(tmp_path, CHATML_SPECIALS, "<|im_start|>", "<|im_end|>", template)
    ours, ref = load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "x"}]
    assert ours.render_chat(messages) == ref.apply_chat_template(messages, tokenize=False)
