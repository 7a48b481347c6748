"""Gemma tokenizers: SentencePiece ``tokenizer.model`` and ``tokenizer.json`` give transformers' ids,
and Gemma's chat templates render exactly as transformers renders them.

The tokenizer is a tiny SentencePiece BPE trained here with Gemma's settings (byte fallback, no
dummy prefix, spaces kept as they are, digits split); transformers converts it to
``tokenizer.json`` itself. The chat templates are the Jinja text of Google's released models.
"""

from __future__ import annotations

import io
import json
import random
import shutil

import pytest

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from tunesmith.data import load_tokenizer  # noqa: E402

# google/gemma-7b-it and google/gemma-2-*-it: no system role.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# google/gemma-3-*-it: a system message is folded into the first user turn.
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces,   three inside and a trailing one ",
    "tabs\tand\nnewlines\n\n\nand\r\nwindows",
    "ünïcödé Zażółć gęślą jaźń — 日本語のテキスト 🙂🚀 ﬁ",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # code\n",
    "digits 1234567890, 3.14159 and 1e-9; phone +49 (0)30 123",
    "<start_of_turn>user\nhi there<end_of_turn>\n<start_of_turn>model\n",
    "text right after<end_of_turn>special tokens",
    "",
    " ",
]
WORDS = ("the quick brown fox jumps over lazy dog hello world model user turn code return def data "
         "value print list range index file name city age").split()


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """(dir with only tokenizer.model, dir with transformers' tokenizer.json), one template each."""
    rng = random.Random(0)
    corpus = [" ".join(rng.choices(WORDS, k=10)) + f" {rng.randint(0, 9999)}." for _ in range(400)]
    corpus += ["def f(x):\n    return x", "  indented\tline", "ünïcödé 日本語 🙂", "(0)[1]{2} +-*/ = ; :"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=420, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, character_coverage=1.0,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", control_symbols=["<start_of_turn>", "<end_of_turn>"], minloglevel=2,
    )
    base = tmp_path_factory.mktemp("gemma_tok")
    spm_dir, json_dir = base / "spm", base / "json"
    spm_dir.mkdir()
    (spm_dir / "tokenizer.model").write_bytes(model.getvalue())
    (spm_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "chat_template": GEMMA_TEMPLATE,
    }))
    transformers.AutoTokenizer.from_pretrained(spm_dir).save_pretrained(json_dir)
    (json_dir / "tokenizer.model").unlink(missing_ok=True)  # so our loader must read tokenizer.json
    assert (json_dir / "tokenizer.json").is_file()
    return spm_dir, json_dir


def test_sentencepiece_and_tokenizer_json_give_transformers_ids(tokenizer_dirs):
    spm_dir, json_dir = tokenizer_dirs
    ref = transformers.AutoTokenizer.from_pretrained(json_dir)
    from_spm, from_json = load_tokenizer(str(spm_dir)), load_tokenizer(str(json_dir))
    for text in TEXTS:
        expected = ref(text).input_ids
        assert expected[0] == ref.bos_token_id  # Gemma adds BOS
        assert from_spm.encode(text) == expected, text
        assert from_json.encode(text) == expected, text
        assert from_spm.decode(expected) == from_json.decode(expected) == ref.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("template", ["gemma", "gemma3"])
def test_chat_template_renders_like_transformers(template, tokenizer_dirs, tmp_path):
    _, json_dir = tokenizer_dirs
    tok_dir = tmp_path / template
    shutil.copytree(json_dir, tok_dir)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = GEMMA_TEMPLATE if template == "gemma" else GEMMA3_TEMPLATE
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tok_dir / "chat_template.jinja").unlink(missing_ok=True)
    ref, ours = transformers.AutoTokenizer.from_pretrained(tok_dir), load_tokenizer(str(tok_dir))

    chat = [{"role": "user", "content": "  Hi there!  "}, {"role": "assistant", "content": "Hello.\n"},
            {"role": "user", "content": "Count: 1 2 3"}]
    for gen in (False, True):
        text = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
        assert ours.render_chat(chat, add_generation_prompt=gen) == text
        assert ours.apply_chat_template(chat, add_generation_prompt=gen) == ref.apply_chat_template(
            chat, tokenize=True, add_generation_prompt=gen, return_dict=False)
    assert "<start_of_turn>model\nHello.<end_of_turn>\n" in text  # assistant is "model", content trimmed

    with_system = [{"role": "system", "content": "Be brief."}, *chat]
    if template == "gemma":  # Gemma 1/2 have no system role: both refuse
        with pytest.raises(Exception, match="System role not supported"):
            ref.apply_chat_template(with_system, tokenize=False)
        with pytest.raises(Exception, match="System role not supported"):
            ours.render_chat(with_system)
    else:  # Gemma 3 folds it into the first user turn
        text = ref.apply_chat_template(with_system, tokenize=False)
        assert ours.render_chat(with_system) == text
        assert text.startswith("<bos><start_of_turn>user\nBe brief.\n\nHi there!<end_of_turn>")


@pytest.mark.parametrize("with_system", [False, True])
def test_fallback_gemma_template_renders_like_gemma3s_own(with_system):
    """The built-in `chat_template: gemma` (for GGUFs that carry none) equals Gemma 3's released template."""
    from tunesmith.data import chat_templates
    from tunesmith.data.tokenizer import compile_template

    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Name a city."}]
    if with_system:
        messages = [{"role": "system", "content": "Answer briefly."}] + messages
    kw = dict(messages=messages, add_generation_prompt=True, bos_token="<bos>", eos_token="<eos>")
    ours = compile_template(chat_templates.get("gemma")).render(**kw)
    theirs = compile_template(GEMMA3_TEMPLATE).render(**kw)
    assert ours == theirs
