"""GGUF out for Qwen2/2.5, Qwen3, Mistral and Phi-3/Phi-4-mini, on tiny random models with LoRA folded in.

The references: transformers' GGUF loader (``from_pretrained(dir, gguf_file=...)``) must read our f32 file
back to our merged model's logits, and its GGUF tokenizer must encode like the tokenizer we exported;
our own loader must read it back too. Where transformers' loader cannot express a feature (Phi-3's
partial rotary and LongRoPE: it reads neither), our loader and the file's metadata are checked instead.
Each family's tokenizer is built the way its release spells it: Qwen's byte-level BPE with Qwen's
split regex and ChatML, Mistral's SentencePiece model with ``[INST]``, Phi-3's SentencePiece-style
``tokenizer.json`` (byte fallback, a ``▁``-prepending normalizer) with ``<|user|>`` / ``<|end|>``.
"""

from __future__ import annotations

import json
import warnings

import gguf
import pytest
import torch

transformers = pytest.importorskip("transformers")

from export_helpers import CHAT, TEXTS, assert_same_tokenizer, with_lora  # noqa: E402
from family_helpers import make_hf  # noqa: E402
from test_family_chat_templates import MISTRAL_SPECIALS, PHI_SPECIALS, QWEN3_SPECIALS  # noqa: E402
from test_tokenizer import CHATML_SPECIALS, build_bpe_dir, build_spm_dir  # noqa: E402

from tunesmith.data import chat_templates, load_tokenizer  # noqa: E402
from tunesmith.data.gguf_vocab import gguf_tokenizer_metadata  # noqa: E402
from tunesmith.data.modelfile import chat_format, modelfile  # noqa: E402
from tunesmith.models import (  # noqa: E402
    llama_hf, load_pretrained, mistral_builders, mistral_hf, phi3_builders, phi3_hf, qwen_builders, qwen_hf,
)
from tunesmith.models.gguf_loader import dequantize_tensor, read_metadata  # noqa: E402
from tunesmith.models.gguf_writer import save_gguf  # noqa: E402
from tunesmith.models.hf_checkpoint import family_of  # noqa: E402
from tunesmith.models.merged_weights import iter_merged_tensors, merged_config  # noqa: E402

PAD_ROWS = 5  # embedding rows past the tokenizer's vocabulary, as Qwen2.5's and Phi-3's releases have


def byte_level_dir(path, specials, bos, eos, template, split, behavior="Isolated", **extra):
    """A byte-level BPE whose tokenizer.json splits text with ``split`` (the family's release regex)."""
    build_bpe_dir(path, specials, bos, eos, template, **extra)
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": split}, "behavior": behavior, "invert": behavior == "Removed"},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    (path / "tokenizer.json").write_text(json.dumps(spec))
    return path


def byte_level_tokenizer_dirs(base):
    """Qwen2.5 / Qwen3 (ChatML, Qwen's split), Mistral NeMo (Tekken's split, BOS by the post-processor) and
    Phi-4-mini (o200k's split as tiktoken conversions spell it: keep the matches, drop the rest)."""
    from tunesmith.data.gguf_tokenizer import _GPT4O_SPLIT, _QWEN2_SPLIT, _TEKKEN_SPLIT

    pad = {"config_extra": {"pad_token": "<|endoftext|>"}}
    return {
        "qwen2_5": byte_level_dir(base / "qwen2_5", CHATML_SPECIALS, None, "<|im_end|>", chat_templates.get("qwen2_5"),
                                  _QWEN2_SPLIT, **pad),
        "qwen3": byte_level_dir(base / "qwen3", QWEN3_SPECIALS, None, "<|im_end|>", chat_templates.get("qwen3"),
                                _QWEN2_SPLIT, **pad),
        "tekken": byte_level_dir(base / "tekken", MISTRAL_SPECIALS, "<s>", "</s>", chat_templates.get("mistral"),
                                 _TEKKEN_SPLIT, bos_post_processor=True),
        "phi4": byte_level_dir(base / "phi4", PHI_SPECIALS, None, "<|endoftext|>", chat_templates.get("phi4"),
                               _GPT4O_SPLIT, "Removed", **pad),
    }


def phi3_tokenizer_dir(path):
    """Phi-3-mini's tokenizer.json shape: a SentencePiece BPE with byte fallback, ``▁`` prepended by the
    normalizer (no pre-tokenizer), the chat markers added as special tokens after the pieces."""
    spm_dir = build_spm_dir(path / "spm")
    ref = transformers.AutoTokenizer.from_pretrained(spm_dir)
    ref.add_special_tokens({"additional_special_tokens": PHI_SPECIALS})
    ref.save_pretrained(path / "json")
    spec = json.loads((path / "json" / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    spec["pre_tokenizer"] = None
    (path / "json" / "tokenizer.json").write_text(json.dumps(spec))
    for stale in ("tokenizer.model", "chat_template.jinja"):  # the SentencePiece model, Llama 2's template
        (path / "json" / stale).unlink(missing_ok=True)
    (path / "json" / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<unk>", "chat_template": chat_templates.get("phi3")}))
    return path / "json"


# Widths the quantized types' 32-value blocks divide (a row they do not divide stays F16, as in llama.cpp).
BLOCKS = {"hidden_size": 64, "intermediate_size": 64}
# family → (tiny HF case, config changes, tokenizer, LoRA targets, transformers' loader reads it)
FAMILIES = {
    "qwen2": ("qwen2_bias_gqa", BLOCKS, "qwen2_5", ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "output"], True),
    # transformers' GGUF loader reads no head_dim for qwen3 (it takes its default, 128)
    "qwen3": ("qwen3_tied", {**BLOCKS, "head_dim": 128}, "qwen3", ["q_proj", "v_proj", "gate_proj", "down_proj"], True),
    "mistral": ("mistral_v03", BLOCKS, "mistral", ["q_proj", "k_proj", "o_proj", "down_proj", "output"], True),
    "phi3": ("phi3_sliding", {**BLOCKS, "sliding_window": None}, "phi3",
             ["qkv_proj", "gate_up_proj", "o_proj", "output"], True),
    # Phi-4-mini: partial rotary (6 of 12 dims), LongRoPE (transformers' GGUF loader reads neither), a tied
    # head, o200k tokens
    "phi4_mini": ("phi3_partial_longrope", {**BLOCKS, "hidden_size": 96, "num_attention_heads": 8}, "phi4",
                  ["qkv_proj", "gate_up_proj", "down_proj"], False),
    # Mistral NeMo's shape: head_dim 16 ≠ 64 / 4, the Tekken tokenizer
    "mistral_nemo": ("mistral_v03", BLOCKS, "tekken", ["q_proj", "v_proj", "gate_proj"], True),
}


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("family_tokenizers")
    return {**byte_level_tokenizer_dirs(base), "phi3": phi3_tokenizer_dir(base / "phi3"),
            "mistral": build_spm_dir(base / "mistral", template=chat_templates.get("mistral"))}


@pytest.fixture(scope="module")
def exported(tokenizer_dirs, tmp_path_factory):
    """family → (merged model, tokenizer, tokens, f32 GGUF path): each model with LoRA folded in, exported once."""
    out = {}
    for family, (case, changes, tok_kind, targets, _) in FAMILIES.items():
        folder = tmp_path_factory.mktemp(family)
        tok = load_tokenizer(str(tokenizer_dirs[tok_kind]))
        hf = make_hf(case, vocab_size=tok.vocab_size + PAD_ROWS, **changes)
        hf.save_pretrained(folder / "hf")
        model = with_lora(load_pretrained(str(folder / "hf")), targets)
        tokens = torch.randint(3, tok.vocab_size, (2, 29), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert (model(tokens) - hf(tokens).logits).abs().max() > 1e-2  # the adapters matter
        path = save_gguf(model, folder / "gguf" / "model-f32.gguf", "f32", name=f"{family} tiny",
                         tokenizer=gguf_tokenizer_metadata(tok, model.config.vocab_size))
        out[family] = model, tok, tokens, path
    return out


def diff(a, b) -> float:
    return (a - b).abs().max().item()


def transformers_gguf(path):
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return ref.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_gguf_reads_back_to_the_merged_logits_in_transformers_and_ours(family, exported):
    model, _, tokens, path = exported[family]
    with torch.no_grad():
        merged = model(tokens)
        ours = load_pretrained(str(path))
        back = ours(tokens)
        assert diff(back, merged) <= 1e-4  # (merged weights vs. base + LoRA: float rounding only)
        if FAMILIES[family][4]:
            theirs = transformers_gguf(path)(tokens).logits
            assert diff(theirs, merged) <= 1e-4
            assert diff(theirs, back) <= 1e-5  # the same weights, read by two loaders
    assert ours.config.tie_embeddings == model.config.tie_embeddings


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_reads_our_gguf_tokenizer_as_the_original(family, exported, tokenizer_dirs):
    _, tok, _, path = exported[family]
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    reference = transformers.AutoTokenizer.from_pretrained(tokenizer_dirs[FAMILIES[family][2]])
    assert_same_tokenizer(theirs, tok, reference, decode_like_reference=family == "mistral")
    ours = load_tokenizer(str(path))  # and our own GGUF tokenizer reads it back (Tekken's, o200k's splits too)
    assert [ours.encode(text) for text in TEXTS] == [tok.encode(text) for text in TEXTS]
    assert ours.chat_template == tok.chat_template


def test_gguf_metadata_names_each_familys_tokenizer_and_end_of_turn(exported):
    expected = {  # family → (architecture, tokenizer model, pre-tokenizer, end-of-turn token)
        "qwen2": ("qwen2", "gpt2", "qwen2", "<|im_end|>"), "qwen3": ("qwen3", "gpt2", "qwen2", "<|im_end|>"),
        "mistral": ("llama", "llama", "default", "</s>"), "phi3": ("phi3", "llama", "default", "<|end|>"),
        "mistral_nemo": ("llama", "gpt2", "tekken", "</s>"), "phi4_mini": ("phi3", "gpt2", "gpt-4o", "<|end|>"),
    }
    for family, (arch, model, pre, end) in expected.items():
        _, tok, _, path = exported[family]
        meta = read_metadata(gguf.GGUFReader(path))
        tokens = meta["tokenizer.ggml.tokens"]
        assert (meta["general.architecture"], meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == \
            (arch, model, pre), family
        assert tokens[meta.get("tokenizer.ggml.eot_token_id", meta["tokenizer.ggml.eos_token_id"])] == end, family
        assert meta["tokenizer.chat_template"] == tok.chat_template
        assert len(tokens) == meta[f"{arch}.vocab_size"] == tok.vocab_size + PAD_ROWS
    phi = read_metadata(gguf.GGUFReader(exported["phi3"][3]))
    assert phi["tokenizer.ggml.add_space_prefix"] is True  # Phi-3's normalizer prepends "▁", as llama.cpp's SPM does


def test_phi3_longrope_partial_rotary_and_fused_tensors_are_written_as_llama_cpp_reads_them(exported):
    model, _, _, path = exported["phi4_mini"]
    reader = gguf.GGUFReader(path)
    meta, tensors = read_metadata(reader), {t.name: t for t in reader.tensors}
    cfg = model.config
    assert meta["phi3.rope.dimension_count"] == cfg.rotary_dim == 6
    assert meta["phi3.rope.scaling.original_context_length"] == 16
    assert meta["phi3.rope.scaling.attn_factor"] == pytest.approx(cfg.attention_factor)
    assert tensors["rope_factors_long.weight"].data.tolist() == cfg.rope_scaling["long_factor"]
    assert list(tensors["blk.0.attn_qkv.weight"].shape) == [96, (8 + 2 * 2) * 12]  # [in, out], fused [q | k | v]
    assert list(tensors["blk.0.ffn_up.weight"].shape) == [96, 2 * cfg.intermediate_size]  # fused [gate | up]
    assert "output.weight" not in tensors and "blk.0.attn_q.weight" not in tensors


@pytest.mark.parametrize("family", FAMILIES)
def test_q8_0_holds_each_merged_weight_within_half_a_step_and_reads_back_close(family, exported, tmp_path):
    model, tok, tokens, _ = exported[family]
    vocab = gguf_tokenizer_metadata(tok, model.config.vocab_size)
    path = save_gguf(model, tmp_path / "model-q8_0.gguf", "q8_0", tokenizer=vocab)
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    table, cfg = family_of(model), merged_config(model)
    names = table.ours_to_gguf(cfg)
    for ours, w in iter_merged_tensors(model):  # every 2-D weight is Q8_0: 32 values share a scale amax / 127
        t = stored[names[ours]]
        if len(t.shape) == 1:
            continue
        assert t.tensor_type.name == "Q8_0", names[ours]
        w = table.to_gguf_tensor(ours, w, cfg).float().reshape(-1, 32)
        step = w.abs().amax(dim=1, keepdim=True) / 127
        error = (dequantize_tensor(t).reshape(-1, 32) - w).abs()
        # half a step, plus the scale's rounding to fp16 (2^-11 relative) times |q| ≤ 127
        assert (error <= (0.5 + 127 * 2**-11) * step + 1e-7).all(), names[ours]
    with torch.no_grad():
        merged, ours = model(tokens), load_pretrained(str(path))(tokens)
    # Measured (logits: std 1.1-1.6, max |logit| 4.8-7.4): max |Δ| qwen2 0.22, qwen3 0.11, mistral 0.21, phi3 0.31,
    # phi4_mini 0.51, mistral_nemo 0.26: these random 3-layer models amplify weight noise (q8_0 is 0.6% of a
    # weight's std); 0.15 of the largest logit bounds every family.
    assert 0 < diff(ours, merged) <= 0.15 * merged.abs().max().item()


def test_configs_llama_cpp_cannot_run_are_refused_or_warned():
    with pytest.raises(ValueError, match="sliding window"):
        qwen_hf.config_to_gguf(qwen_hf.config_from_hf(make_hf("qwen2_tied_sliding").config.to_dict()))
    with pytest.raises(ValueError, match="head_dim"):
        phi3_hf.config_to_gguf(phi3_builders.phi3_mini_4k(head_dim=64))
    with pytest.warns(UserWarning, match="up to 4096 tokens"):
        assert mistral_hf.config_to_gguf(mistral_builders.mistral_7b_v0_1())["general.architecture"] == "llama"
    with pytest.warns(UserWarning, match="up to 2047 tokens"):
        assert phi3_hf.config_to_gguf(phi3_builders.phi3_mini_4k())["phi3.attention.sliding_window"] == 2047
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mistral_hf.config_to_gguf(mistral_builders.mistral_7b())
        phi3_hf.config_to_gguf(phi3_builders.phi4_mini())  # its window (262,144) exceeds its context


@pytest.mark.parametrize("builder,family", [
    (qwen_builders.qwen3_0_6b, qwen_hf), (qwen_builders.qwen2_5_7b, qwen_hf), (mistral_builders.mistral_7b, mistral_hf),
    (phi3_builders.phi3_mini_4k, phi3_hf), (phi3_builders.phi4_mini, phi3_hf)])
@pytest.mark.filterwarnings("ignore:sliding_window=2047")  # Phi-3-mini-4k's window, checked above
def test_real_size_configs_survive_gguf_metadata(builder, family):
    cfg = builder()
    meta = family.config_to_gguf(cfg) | {"tokenizer.ggml.bos_token_id": cfg.bos_token_id,
                                         "tokenizer.ggml.eos_token_id": cfg.eos_token_id}
    meta.update({name.removesuffix(".weight"): t for name, t in family.extra_gguf_tensors(cfg).items()})
    back = (llama_hf if family is mistral_hf else family).config_from_gguf(meta)  # llama.cpp's Mistral is "llama"
    fields = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "head_dim",
              "norm_eps", "rope_theta", "max_seq_len")
    assert [getattr(back, f) for f in fields] == [getattr(cfg, f) for f in fields]
    if family is phi3_hf:
        assert (back.rotary_dim, back.sliding_window, back.attention_factor) == \
            (cfg.rotary_dim, cfg.sliding_window, cfg.attention_factor)
        if cfg.rope_scaling:
            assert back.rope_scaling["long_factor"] == pytest.approx(cfg.rope_scaling["long_factor"])


@pytest.mark.parametrize("family,template,stops", [
    ("qwen2", "<|im_start|>assistant", ["<|im_end|>", "<|endoftext|>"]),
    ("mistral", "[INST]", ["</s>"]),
    ("phi3", "<|assistant|>", ["<|endoftext|>", "<|end|>"]),
])
def test_modelfile_has_each_familys_template_and_stops(family, template, stops, exported):
    text = modelfile(exported[family][1], "model-f32.gguf")
    assert template in text.split('TEMPLATE """')[1]
    assert [line.split('"')[1] for line in text.splitlines() if line.startswith("PARAMETER stop")] == stops


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_export_recipe_writes_each_familys_gguf_and_modelfile_from_an_adapter(family, tokenizer_dirs, tmp_path):
    """An adapter + HF base (tokenizer beside the weights), as a LoRA run leaves it; Phi-3's on its fused layers."""
    import shutil

    import yaml

    from tunesmith.models import save_peft_adapter
    from tunesmith.recipes import export
    from tunesmith.training.config import build_config

    case, changes, tok_kind, targets, _ = FAMILIES[family]
    base = tmp_path / "base"
    shutil.copytree(tokenizer_dirs[tok_kind], base)
    tok = load_tokenizer(str(base))
    make_hf(case, vocab_size=tok.vocab_size + PAD_ROWS, **changes).save_pretrained(base)
    model = with_lora(load_pretrained(str(base)), targets[:2])
    step = tmp_path / "run" / "step_000004"
    save_peft_adapter(model, step / "adapter", base_model=str(base), rank=4, alpha=8.0, dropout=0.0,
                      targets=targets[:2])
    (step / "config.yaml").write_text(yaml.safe_dump({"model": str(base), "lora": {"rank": 4, "targets": targets[:2]}}))
    export.main(build_config(export.Config, {}, [f"checkpoint={step}", "gguf=[f32]", "merged=false"]))
    path = step / "export" / "gguf" / "model-f32.gguf"
    tokens = torch.randint(3, tok.vocab_size, (1, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert diff(transformers_gguf(path)(tokens).logits, model(tokens)) <= 1e-4
    text = (path.parent / "Modelfile").read_text()
    assert {"qwen2": "<|im_start|>assistant\n", "phi3": "<|assistant|>\n"}[family] in text
    assert {"qwen2": 'SYSTEM """You are Qwen', "phi3": 'PARAMETER stop "<|end|>"'}[family] in text


def test_llama2_inst_format_is_not_taken_for_mistrals(exported):
    tok = exported["mistral"][1]
    tok.chat_template, template = chat_templates.get("llama2"), tok.chat_template
    try:
        assert chat_format(tok) is None  # [INST] <<SYS>>: no Go template here, so none is written
    finally:
        tok.chat_template = template
    assert chat_format(tok) == "mistral"


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_runs_our_gguf_to_the_merged_logits_and_tokenizes_like_the_original(family, exported):
    """llama.cpp itself, through llama-cpp-python where it is installed (a source build: ``pip install
    llama-cpp-python diskcache``); skipped elsewhere. The KV cache is kept in f32 so only the file differs."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model, tok, tokens, path = exported[family]
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, type_k=0, type_v=0, n_threads=2, verbose=False)
    llm.eval(tokens[0].tolist())
    with torch.no_grad():
        assert diff(torch.tensor(llm.scores[: tokens.shape[1]]), model(tokens)[0]) <= 1e-4
    # llama.cpp's SentencePiece tokenizer (Mistral, Phi-3) adds its "▁" by rules of its own: before text that
    # already starts with a space (SentencePiece does not) and only after the first of the special tokens
    # in a chat (a tokenizer.json normaliser adds it after each); no GGUF key changes that, so for these
    # vocabularies the plain texts are compared, and the rest where the vocabulary is byte-level.
    spm = FAMILIES[family][2] in ("mistral", "phi3")
    for text in TEXTS + [tok.render_chat(CHAT, add_generation_prompt=True)]:
        if not (spm and (text[:1].isspace() or "<" in text)):
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(text), text
    ends = {llm.detokenize([i], special=True).decode() for i in (llm.token_eos(), llm._model.token_eot()) if i >= 0}
    assert ends == {tok.eos_token} | {t for t in ("<|im_end|>", "<|end|>") if tok.token_to_id(t) is not None}
    llm.close()


@pytest.mark.parametrize("case", ["phi3_sliding", "qwen3_qk_norm"])
def test_llama_cpp_runs_what_transformers_gguf_loader_cannot(case, tokenizer_dirs, tmp_path):
    """Qwen3's head_dim 12 ≠ 40 / 4 (transformers reads no head_dim from GGUF), and Phi-3's 9-token window,
    which llama.cpp reads but does not apply ("Phi SWA is currently disabled"): the same logits while the
    context fits in the window, and the writer warns."""
    llama_cpp = pytest.importorskip("llama_cpp")
    tok = load_tokenizer(str(tokenizer_dirs["qwen2_5"]))
    make_hf(case, vocab_size=tok.vocab_size).save_pretrained(tmp_path / "hf")
    model = load_pretrained(str(tmp_path / "hf"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vocab = gguf_tokenizer_metadata(tok, tok.vocab_size)
        path = save_gguf(model, tmp_path / "model-f32.gguf", "f32", tokenizer=vocab)
    fits = 9 if case == "phi3_sliding" else 29
    assert [str(w.message)[:18] for w in caught] == (["sliding_window=9: "] if case == "phi3_sliding" else [])
    tokens = torch.randint(3, tok.vocab_size, (1, 29), generator=torch.Generator().manual_seed(3))
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, type_k=0, type_v=0, n_threads=2, verbose=False)
    llm.eval(tokens[0].tolist())
    with torch.no_grad():
        assert diff(torch.tensor(llm.scores[:fits]), model(tokens)[0, :fits]) <= 1e-4
    llm.close()
