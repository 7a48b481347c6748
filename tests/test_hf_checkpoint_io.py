"""Writing HF checkpoints (merged LoRA, sharded), reading them back, Hub ids, and bad inputs."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from tunesmith.models import (  # noqa: E402
    CheckpointFormatError,
    Llama,
    apply_lora,
    load_pretrained,
    resolve_model_dir,
    save_hf_checkpoint,
    tiny_llama,
)
from tunesmith.models.llama import rope_inv_freq  # noqa: E402
from tunesmith.models.lora import LoRALinear, disable_adapters  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "output"]


def random_lora_model(tie: bool, seed: int = 0) -> Llama:
    """A tiny Llama with LoRA on every target and nonzero B (so merging changes the weights)."""
    torch.manual_seed(seed)
    model = Llama(tiny_llama(vocab_size=101, hidden_size=48, num_heads=6, num_kv_heads=2, intermediate_size=72,
                             tie_embeddings=tie, norm_eps=1e-5))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    apply_lora(model, TARGETS, rank=4, alpha=8.0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.weight.normal_(0, 0.05)
    return model.eval()


def hf_logits(path, tokens) -> torch.Tensor:
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(tokens).logits


TOKENS = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_merged_lora_checkpoint_loads_in_transformers(tie, tmp_path):
    model = random_lora_model(tie)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ours = model(TOKENS)
        with disable_adapters(model):
            base_only = model(TOKENS)
    assert (ours - base_only).abs().max().item() > 1e-2  # the adapter really changes the output
    save_hf_checkpoint(model, tmp_path)

    # The model itself was not merged or changed.
    assert not any(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    # A LoRA on a tied output head makes the merged head differ from the embedding: saved untied.
    assert config["tie_word_embeddings"] is False
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "lm_head.weight" in keys and not any("lora" in k for k in keys)

    expected = hf_logits(tmp_path, TOKENS)
    assert (ours - expected).abs().max().item() <= 1e-4


def test_tied_model_without_output_lora_stays_tied(tmp_path):
    torch.manual_seed(0)
    model = Llama(tiny_llama(vocab_size=101, tie_embeddings=True)).eval()
    apply_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4.0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.weight.normal_(0, 0.05)
        ours = model(TOKENS)
    save_hf_checkpoint(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in set(load_file(tmp_path / "model.safetensors"))
    assert (ours - hf_logits(tmp_path, TOKENS)).abs().max().item() <= 1e-4
    # And we read our own output back to the same logits.
    back = load_pretrained(str(tmp_path))
    assert back.output.weight is back.tok_embeddings.weight
    with torch.no_grad():
        assert (back(TOKENS) - ours).abs().max().item() <= 1e-5


def test_sharded_save_loads_in_transformers_and_back(tmp_path):
    model = random_lora_model(tie=False)
    with torch.no_grad():
        ours = model(TOKENS)
    save_hf_checkpoint(model, tmp_path, max_shard_bytes=40_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    on_disk = 0
    for shard in shards:
        with safe_open(tmp_path / shard, framework="pt") as f:
            assert all(index["weight_map"][k] == shard for k in f.keys())
            on_disk += sum(f.get_tensor(k).numel() * 4 for k in f.keys())
    assert index["metadata"]["total_size"] == on_disk

    assert (ours - hf_logits(tmp_path, TOKENS)).abs().max().item() <= 1e-4
    # A re-save with fewer shards must not leave stale shard files behind.
    save_hf_checkpoint(model, tmp_path)
    assert not list(tmp_path.glob("model-*-of-*.safetensors"))


def test_dtype_and_only_model_files(tmp_path):
    model = Llama(tiny_llama())
    out = save_hf_checkpoint(model, tmp_path / "out", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "model.safetensors").values())
    # the model layer writes weights and config only; tokenizer files come from the training layer
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    back = load_pretrained(str(out), dtype=torch.bfloat16)
    assert back.tok_embeddings.weight.dtype == torch.bfloat16
    # RoPE frequencies stay fp32 and exact (built on the meta device, recomputed after loading).
    cfg = back.config
    assert torch.equal(back.inv_freq, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))


# -- bad inputs --------------------------------------------------------------------------------------
@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "ckpt"
    save_hf_checkpoint(Llama(tiny_llama()), path)
    return path


def test_shape_mismatch_names_file_key_and_shapes(saved):
    config = json.loads((saved / "config.json").read_text())
    config["intermediate_size"] = 65
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError) as err:
        load_pretrained(str(saved))
    msg = str(err.value)
    assert str(saved / "model.safetensors") in msg
    assert re.search(r"'model\.layers\.\d\.mlp\.(gate|up|down)_proj\.weight'", msg)
    shapes = re.findall(r"\((\d+), (\d+)\)", msg)  # the file's shape, then the model's
    assert len(shapes) == 2 and "64" in shapes[0] and "65" in shapes[1]


def test_missing_shard_names_index_and_file(tmp_path):
    save_hf_checkpoint(Llama(tiny_llama()), tmp_path, max_shard_bytes=20_000)
    victim = sorted(tmp_path.glob("model-*-of-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointFormatError) as err:
        load_pretrained(str(tmp_path))
    assert "model.safetensors.index.json" in str(err.value) and victim.name in str(err.value)


def test_pickle_checkpoint_is_refused(saved):
    state = load_file(saved / "model.safetensors")
    (saved / "model.safetensors").unlink()
    torch.save(state, saved / "pytorch_model.bin")
    with pytest.raises(CheckpointFormatError) as err:
        load_pretrained(str(saved))
    assert "pytorch_model.bin" in str(err.value) and "safetensors" in str(err.value)


def test_unknown_and_missing_tensors_are_named(saved):
    state = load_file(saved / "model.safetensors")
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    save_file(state, saved / "model.safetensors")
    with pytest.raises(CheckpointFormatError, match="q_norm"):
        load_pretrained(str(saved))
    del state["model.layers.0.self_attn.q_norm.weight"], state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, saved / "model.safetensors")
    with pytest.raises(CheckpointFormatError, match=r"layers\.1\.mlp\.up_proj"):
        load_pretrained(str(saved))


def test_unsupported_model_type_is_named(saved):
    config = json.loads((saved / "config.json").read_text())
    config["model_type"] = "mamba"
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError, match="mamba"):
        load_pretrained(str(saved))


# -- Hub ids -----------------------------------------------------------------------------------------
def test_hub_repo_id_resolves_from_local_cache_offline(saved, tmp_path, monkeypatch):
    """A repo id goes through huggingface_hub's cache layout (no network: HF_HUB_OFFLINE=1)."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--tiny-org--tiny-llama" / "snapshots" / revision
    shutil.copytree(saved, snapshot)
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these when first imported; patch the parsed values too.
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    assert resolve_model_dir("tiny-org/tiny-llama").resolve() == snapshot.resolve()
    model = load_pretrained("tiny-org/tiny-llama")
    expected = load_pretrained(str(saved))
    assert torch.equal(model.layers[0].attn.q_proj.weight, expected.layers[0].attn.q_proj.weight)

    # Not in the cache, and offline: huggingface_hub says so instead of reaching the network.
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        load_pretrained("tiny-org/not-there")


def test_missing_local_path_is_not_taken_for_a_repo_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="not-a-dir"):
        resolve_model_dir(str(tmp_path / "not-a-dir"))
