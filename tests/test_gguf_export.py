"""GGUF export on tiny random models: transformers' GGUF loader (the reference) reads our files back to our
merged model's logits, our own loader does too, and the file holds what llama.cpp's tools would write.

Every model carries LoRA adapters with nonzero B, so what is exported is really base + update.
"""

from __future__ import annotations

import dataclasses

import gguf
import pytest
import torch

transformers = pytest.importorskip("transformers")

from export_helpers import with_lora  # noqa: E402
from test_gemma_tokenizer import tokenizer_dirs  # noqa: E402, F401  (a tiny Gemma-style SentencePiece model)

from tunesmith.data import load_tokenizer  # noqa: E402
from tunesmith.data.gguf_vocab import gguf_tokenizer_metadata  # noqa: E402
from tunesmith.models import load_pretrained  # noqa: E402
from tunesmith.models import builders, gemma_builders, gemma_hf, llama_hf  # noqa: E402
from tunesmith.models.gguf_loader import read_metadata  # noqa: E402
from tunesmith.models.gguf_writer import save_gguf  # noqa: E402
from tunesmith.models.llama import LlamaConfig  # noqa: E402
from tunesmith.models.merged_weights import iter_merged_tensors  # noqa: E402
from tunesmith.models.llama import Llama  # noqa: E402

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "output"]


def gemma_hf_model(version: int, vocab: int, path):
    """A random HF Gemma that llama.cpp and transformers' GGUF loader can both express: head_dim 256 =
    query_pre_attn_scalar for 2/3 (both hard-code it), Gemma 2's default soft-caps, Gemma 3's 5:1 layers."""
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_attention_heads=2, head_dim=256,
                  num_key_value_heads=1, max_position_embeddings=128, rms_norm_eps=1e-6)
    if version == 1:
        cfg = transformers.GemmaConfig(**{**common, "head_dim": 32}, num_hidden_layers=2)
    elif version == 2:
        cfg = transformers.Gemma2Config(**common, num_hidden_layers=4, sliding_window=8, query_pre_attn_scalar=256)
    else:
        cfg = transformers.Gemma3TextConfig(**common, num_hidden_layers=7, sliding_window=8, query_pre_attn_scalar=256)
    torch.manual_seed(version)
    model = getattr(transformers, {1: "GemmaForCausalLM", 2: "Gemma2ForCausalLM", 3: "Gemma3ForCausalLM"}[version])(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if "norm" in name else 0.1)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    return load_tokenizer(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def tokens(tok):
    return torch.tensor([tok.encode("red green blue cat dog fish one two three four five apple pear plum tree")])


def export(model, tok, path, file_type="f32"):
    return save_gguf(model, path, file_type, tokenizer=gguf_tokenizer_metadata(tok, model.config.vocab_size))


def transformers_logits(path, tokens):
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return ref.eval()(tokens).logits


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
def test_f32_gguf_loads_in_transformers_and_back_in_ours_to_the_merged_logits(family, tiny_llama_dir, tok, tokens, tmp_path):
    source = tiny_llama_dir if family == "llama" else gemma_hf_model(int(family[-1]), tok.vocab_size, tmp_path / "hf")
    targets = ALL_TARGETS if family == "llama" else ALL_TARGETS[:-1]  # Gemma 2's head is always tied in llama.cpp
    model = with_lora(load_pretrained(str(source)), targets)
    with torch.no_grad():
        merged = model(tokens)
        assert (merged - load_pretrained(str(source))(tokens)).abs().max() > 1e-2  # the adapters matter
    path = export(model, tok, tmp_path / "model-f32.gguf")

    assert (transformers_logits(path, tokens) - merged).abs().max().item() <= 1e-4
    with torch.no_grad():
        assert (load_pretrained(str(path))(tokens) - merged).abs().max().item() <= 1e-5


def test_llama3_rope_scaling_tied_head_with_lora_and_gemma1_round_trip_through_our_loader(tok, tokens, tmp_path):
    # Llama 3.x RoPE scaling travels as the rope_freqs tensor; a LoRA on a tied head unties it in the file.
    cfg = dataclasses.replace(builders.tiny_llama(), vocab_size=tok.vocab_size, tie_embeddings=True, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    llama = with_lora(Llama(cfg), ALL_TARGETS)
    gemma1 = with_lora(load_pretrained(str(gemma_hf_model(1, tok.vocab_size, tmp_path / "g1"))), ALL_TARGETS[:-1])
    for model, name in ((llama, "llama"), (gemma1, "gemma1")):
        path = export(model, tok, tmp_path / f"{name}.gguf")
        back = load_pretrained(str(path))
        with torch.no_grad():
            assert (back(tokens) - model(tokens)).abs().max().item() <= 1e-5, name
    assert back.config.version == 1
    reader = gguf.GGUFReader(tmp_path / "llama.gguf")
    names = {t.name for t in reader.tensors}
    assert {"rope_freqs.weight", "output.weight", "token_embd.weight"} <= names


@pytest.fixture(scope="module")
def tiny_merged(tiny_llama_dir):
    return with_lora(load_pretrained(str(tiny_llama_dir)), ALL_TARGETS)


@pytest.mark.parametrize("file_type", ["f16", "bf16", "q8_0", "q4_0"])
def test_each_type_reads_back_the_same_in_transformers_and_ours_within_its_rounding(
        file_type, tiny_merged, tok, tokens, tmp_path):
    path = export(tiny_merged, tok, tmp_path / f"model-{file_type}.gguf", file_type)
    with torch.no_grad():
        merged, ours = tiny_merged(tokens), load_pretrained(str(path))(tokens)
    assert (transformers_logits(path, tokens) - ours).abs().max().item() <= 1e-4  # same dequantized weights
    # Measured on this model (logits: std 0.20, max 0.79): f16 3.1e-4, bf16 2.8e-3, q8_0 8.2e-3, q4_0 0.12.
    bound = {"f16": 1e-3, "bf16": 1e-2, "q8_0": 3e-2, "q4_0": 0.4}[file_type]
    assert 0 < (ours - merged).abs().max().item() <= bound


def test_tensor_types_follow_llama_cpp(tiny_merged, tok, tmp_path):
    types = {}
    for file_type in ("f16", "q4_0"):
        reader = gguf.GGUFReader(export(tiny_merged, tok, tmp_path / f"{file_type}.gguf", file_type))
        types[file_type] = {t.name: t.tensor_type.name for t in reader.tensors}
        meta = read_metadata(reader)
        assert meta["general.file_type"] == {"f16": 1, "q4_0": 2}[file_type]
    assert types["f16"]["blk.0.attn_norm.weight"] == types["q4_0"]["output_norm.weight"] == "F32"
    assert types["f16"]["blk.1.ffn_down.weight"] == "F16"
    assert types["q4_0"]["blk.1.ffn_down.weight"] == types["q4_0"]["token_embd.weight"] == "Q4_0"
    assert types["q4_0"]["output.weight"] == "Q8_0"  # llama-quantize's Q6_K, written as its own Q8_0 fallback


def test_a_stream_in_any_order_writes_the_same_file_and_a_short_one_is_an_error(tiny_merged, tok, tmp_path):
    meta = gguf_tokenizer_metadata(tok, tiny_merged.config.vocab_size)
    in_order = save_gguf(tiny_merged, tmp_path / "a.gguf", "q8_0", tokenizer=meta)
    backwards = save_gguf(tiny_merged, tmp_path / "b.gguf", "q8_0", tokenizer=meta,
                          tensors=reversed(list(iter_merged_tensors(tiny_merged))))
    assert in_order.read_bytes() == backwards.read_bytes()
    with pytest.raises(ValueError, match="ended before"):
        save_gguf(tiny_merged, tmp_path / "c.gguf", "q8_0", tokenizer=meta, tensors=list(iter_merged_tensors(tiny_merged))[:-1])
    with pytest.raises(KeyError, match="not a parameter"):
        save_gguf(tiny_merged, tmp_path / "d.gguf", "q8_0", tokenizer=meta, tensors=[("layers.0.nope", torch.zeros(1))])
    assert not (tmp_path / "c.gguf").exists() and not list(tmp_path.glob(".tmp-*"))  # nothing half-written


def test_unwritable_models_and_bad_arguments_are_refused(tiny_merged, tok, tmp_path):
    meta = gguf_tokenizer_metadata(tok, tiny_merged.config.vocab_size)
    with pytest.raises(ValueError, match="q4_k_m"):
        save_gguf(tiny_merged, tmp_path / "x.gguf", "q4_k_m", tokenizer=meta)
    with pytest.raises(ValueError, match="vocab_size"):
        save_gguf(tiny_merged, tmp_path / "x.gguf", "f32", tokenizer=gguf_tokenizer_metadata(tok, tok.vocab_size + 5))
    gemma2 = gemma_builders.gemma2_2b()
    with pytest.raises(ValueError, match="ties the output head"):
        gemma_hf.config_to_gguf(dataclasses.replace(gemma2, tie_embeddings=False))
    with pytest.raises(ValueError, match="query_pre_attn_scalar"):
        gemma_hf.config_to_gguf(dataclasses.replace(gemma2, query_pre_attn_scalar=100))


def gguf_meta(family, cfg):
    """What the loader sees for a file written for ``cfg``: metadata + the extra tensors' values."""
    meta = family.config_to_gguf(cfg)
    meta.update({"tokenizer.ggml.bos_token_id": cfg.bos_token_id, "tokenizer.ggml.eos_token_id": cfg.eos_token_id})
    extra = family.extra_gguf_tensors(cfg)
    if "rope_freqs.weight" in extra:
        meta["rope_freqs"] = extra["rope_freqs.weight"]
    return meta


@pytest.mark.parametrize("family,name", [(llama_hf, n) for n in sorted(builders.BUILDERS)
                                          if type(builders.BUILDERS[n]()) is LlamaConfig]
                         + [(gemma_hf, n) for n in sorted(gemma_builders.HUB_IDS)])
def test_every_builder_config_survives_gguf_metadata(family, name):
    build = builders.BUILDERS[name] if family is llama_hf else getattr(gemma_builders, name)
    cfg = dataclasses.replace(build(), bos_token_id=2, eos_token_id=1)
    back = family.config_from_gguf(gguf_meta(family, cfg))
    assert dataclasses.replace(back, tie_embeddings=cfg.tie_embeddings) == cfg  # the loader ties when output is absent


def test_qk_permutation_is_the_inverse_of_the_loaders():
    w = torch.randn(6 * 8, 10)
    assert not torch.equal(llama_hf.permute_qk(w, 6), w)
    assert torch.equal(llama_hf.unpermute_qk(llama_hf.permute_qk(w, 6), 6), w)


def test_transformers_reads_our_gguf_vocabulary_as_the_original(tiny_llama_dir, tiny_merged, tok, tmp_path):
    path = export(tiny_merged, tok, tmp_path / "model-q8_0.gguf", "q8_0")
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    original = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    for text in ["red green blue", "  two  spaces\n\nand 0123456789 {}[]", "<|im_start|>user\nhi<|im_end|>\n", "ünï 🙂"]:
        assert theirs(text).input_ids == original(text).input_ids == tok.encode(text), text
    assert (theirs.eos_token, theirs.pad_token) == ("<|im_end|>", "<|endoftext|>")
    meta = read_metadata(gguf.GGUFReader(path))
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "gpt2")
    assert meta["tokenizer.chat_template"] == tok.chat_template


@pytest.mark.parametrize("source", ["spm", "json"])
def test_sentencepiece_style_vocabulary_reads_back_in_transformers(source, tokenizer_dirs, tmp_path):
    # A Gemma-style SentencePiece BPE, as tokenizer.model (pieces, scores, types from the proto) and as
    # tokenizer.json (byte-fallback BPE: scores from the id order): transformers' GGUF tokenizer, which
    # rebuilds the merges from the scores, must tokenize like the original.
    folder = tokenizer_dirs[0 if source == "spm" else 1]
    tok = load_tokenizer(str(folder))
    model = load_pretrained(str(gemma_hf_model(3, tok.vocab_size, tmp_path / "hf")))
    path = export(model, tok, tmp_path / "model-q8_0.gguf", "q8_0")
    meta = read_metadata(gguf.GGUFReader(path))
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.add_bos_token"]) == ("llama", True)
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    original = transformers.AutoTokenizer.from_pretrained(tokenizer_dirs[1])
    for text in ["the quick brown fox 1234.", "  indented\tline\n\nnext", "ünïcödé 日本語 🙂", "<start_of_turn>user\nhi"]:
        assert theirs(text).input_ids == original(text).input_ids == tok.encode(text), text
