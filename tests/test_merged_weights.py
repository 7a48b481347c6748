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


def test_hf_writer_writes_each_tensor_before_the_next_is_made(tmp_path, monkeypatch):
    """The writer holds no merged tensor beyond the current one: each is appended to its safetensors file
    before the stream yields the next (also across files). The split checkpoint loads back to the same model."""
    from tunesmith.models.safetensors_stream import SafetensorsStream

    model = lora_model(tie=False)
    events: list[str] = []
    import tunesmith.models.merged_weights as merged_weights

    real_stream, real_write = merged_weights.iter_merged_tensors, SafetensorsStream.write

    def recording_stream(m):
        for name, t in real_stream(m):
            events.append(f"tensor {name}")
            yield name, t

    def recording_write(self, name, tensor):
        events.append(f"write {name}")
        return real_write(self, name, tensor)

    monkeypatch.setattr(merged_weights, "iter_merged_tensors", recording_stream)
    monkeypatch.setattr(SafetensorsStream, "write", recording_write)
    out = save_hf_checkpoint(model, tmp_path / "hf", max_shard_bytes=40_000)
    index = __import__("json").loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(index.values()))
    assert len(files) > 3
    table = {ours: hf for hf, ours in hf_checkpoint.llama_hf.hf_to_ours(model.config).items() if ours}
    expected = [e for name in (e.split(" ", 1)[1] for e in events if e.startswith("tensor"))
                for e in (f"tensor {name}", f"write {table[name]}")]
    assert events == expected  # tensor, its write, next tensor, its write, ...
    reloaded = load_pretrained(out)
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens), model(tokens), atol=1e-5, rtol=0)
    assert set(load_file(out / files[0]))  # a real safetensors file


def test_safetensors_stream_refuses_out_of_order_and_removes_an_incomplete_file(tmp_path):
    import pytest

    from tunesmith.models.safetensors_stream import SafetensorsStream

    specs = [("a", (2, 3), torch.bfloat16), ("b", (4,), torch.float32)]
    stream = SafetensorsStream(tmp_path / "x.safetensors", specs, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="expected 'a'"):
        stream.write("b", torch.zeros(4))
    stream.write("a", torch.arange(6.0).reshape(2, 3))
    with pytest.raises(ValueError, match="ended before 'b'"):
        stream.close()
    assert not (tmp_path / "x.safetensors").exists()
    stream = SafetensorsStream(tmp_path / "y.safetensors", specs)
    stream.write("a", torch.arange(6.0).reshape(2, 3))
    stream.write("b", torch.ones(4, dtype=torch.float64))  # cast to the planned dtype
    stream.close()
    back = load_file(tmp_path / "y.safetensors")
    assert back["a"].dtype == torch.bfloat16 and torch.equal(back["a"].float(), torch.arange(6.0).reshape(2, 3))
    assert back["b"].dtype == torch.float32 and torch.equal(back["b"], torch.ones(4))
