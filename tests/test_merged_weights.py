"""The merged-tensor stream every export writes from, and the HF writer that consumes it file by file."""

from __future__ import annotations

import dataclasses

import torch
from safetensors.torch import load_file

from tunesmith.models import apply_lora, builders, load_pretrained, save_hf_checkpoint
from tunesmith.models import hf_checkpoint
from tunesmith.models.llama import Llama
from tunesmith.models.lora import LoRALinear
from tunesmith.models.merged_weights import iter_merged_tensors, merged_tensor_specs


def lora_model(tie: bool, quantize: bool = False) -> Llama:
    torch.manual_seed(0)
    model = Llama(dataclasses.replace(builders.tiny_llama(hidden_size=64, intermediate_size=128), tie_embeddings=tie))
    apply_lora(model, ["q_proj", "down_proj", "output"], rank=4, alpha=8, quantize_base=quantize)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=g) * 0.05)
    return model


def test_stream_yields_our_names_once_with_updates_folded_in():
    model = lora_model(tie=True)
    stream = dict(iter_merged_tensors(model))
    names = [name for name, _, _ in merged_tensor_specs(model)]
    assert list(stream) == names and len(set(names)) == len(names)
    assert not any("lora_" in n for n in names)
    # The tied embedding once, as it is; the adapted head (the same matrix) again, merged.
    assert "tok_embeddings.weight" in stream and "output.weight" in stream
    torch.testing.assert_close(stream["tok_embeddings.weight"], model.tok_embeddings.weight, atol=0, rtol=0)
    q = model.layers[0].attn.q_proj
    expected = q.weight + q.scaling * q.lora_b.weight @ q.lora_a.weight
    torch.testing.assert_close(stream["layers.0.attn.q_proj.weight"], expected, atol=1e-6, rtol=0)
    assert stream["output.weight"].shape == model.tok_embeddings.weight.shape
    assert (stream["output.weight"] - model.tok_embeddings.weight).abs().max() > 1e-4
    # An untied model without LoRA on a shared weight: every parameter once.
    plain = Llama(builders.tiny_llama())
    assert [n for n, _ in iter_merged_tensors(plain)] == [n for n, _ in plain.named_parameters()]


def test_nf4_bases_stream_dense():
    model = lora_model(tie=False, quantize=True)
    stream = dict(iter_merged_tensors(model))
    down = model.layers[1].mlp.down_proj
    assert stream["layers.1.mlp.down_proj.weight"].dtype == torch.float32
    torch.testing.assert_close(stream["layers.1.mlp.down_proj.weight"], down.merged_weight(), atol=0, rtol=0)


def test_hf_writer_writes_each_file_as_soon_as_it_is_full(tmp_path, monkeypatch):
    """The writer never holds more than one file's tensors: file k is on disk before the stream yields
    a tensor of file k + 1. The split checkpoint loads back to the same model."""
    model = lora_model(tie=False)
    events: list[str] = []
    real_save = hf_checkpoint.save_file
    import tunesmith.models.merged_weights as merged_weights

    real_stream = merged_weights.iter_merged_tensors

    def recording_stream(m):
        for name, t in real_stream(m):
            events.append(f"tensor {name}")
            yield name, t

    def recording_save(tensors, path, metadata=None):
        events.append(f"file {path.name}")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(merged_weights, "iter_merged_tensors", recording_stream)
    monkeypatch.setattr(hf_checkpoint, "save_file", recording_save)
    out = save_hf_checkpoint(model, tmp_path / "hf", max_shard_bytes=40_000)
    files = [e for e in events if e.startswith("file")]
    assert len(files) > 3
    # Between two file writes come only the tensors of the second file.
    index = __import__("json").loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    table = {ours: hf for hf, ours in hf_checkpoint.llama_hf.hf_to_ours(model.config).items() if ours}
    current: set[str] = set()
    for event in events:
        kind, name = event.split(" ", 1)
        if kind == "tensor":
            current.add(index[table[name]])
        else:
            assert current <= {name}, f"{name} written while tensors of {current - {name}} were still pending"
            current = set()
    reloaded = load_pretrained(out)
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens), model(tokens), atol=1e-5, rtol=0)
    assert set(load_file(out / files[0].split(" ", 1)[1]))  # a real safetensors file
