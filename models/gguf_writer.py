"""Write our model as a llama.cpp GGUF file (f32, f16, bf16, q8_0, q4_0, q4_1), one tensor at a time.

    model config ─► family.config_to_gguf ─────────────┐
    tokenizer metadata (tunesmith.data.gguf_vocab) ────┼─► header: metadata + every tensor's name/shape/type
    model parameters' shapes ─► family.ours_to_gguf ───┘
    (our name, merged tensor) stream ─► family.to_gguf_tensor ─► gguf.quants.quantize ─► file, then freed

A GGUF file lists every tensor's name, shape and type before any data. All of that is known from the
model without computing a single merged weight (a merged weight has its base weight's shape), so the
header goes out first and the tensors follow one by one as the stream yields them: peak memory is the
model plus one tensor in float32, whatever the model's size.

The per-family knowledge lives in each family's table module next to what the GGUF loader uses
(``models/llama_hf.py``, ``gemma_hf.py``, ``qwen_hf.py``, ``mistral_hf.py``, ``phi3_hf.py``):
``config_to_gguf(cfg)`` (metadata), ``ours_to_gguf(cfg)`` (our name → GGUF name),
``to_gguf_tensor(name, w, cfg)`` (Llama's and Mistral's Q/K permutation, Gemma's ``1 + w`` norms) and
``extra_gguf_tensors(cfg)`` (Llama 3's ``rope_freqs.weight``, Phi-3's LongRoPE ``rope_factors_long/short``).
A new family plugs in by providing those four.

Tensor types follow llama.cpp's own tools: 1-D tensors (norms, ``rope_freqs``) stay F32 in every file,
as its converter writes them; a row length the block size does not divide falls back to F16, as its
converter does. In ``q4_0`` / ``q4_1`` files the output head (or the tied embedding that serves as
it) is Q8_0: ``llama-quantize`` gives it Q6_K, which the ``gguf`` package cannot quantize (it quantizes only the
legacy 32-value-block types), and Q8_0 is llama.cpp's own fallback for Q6_K (SmolLM2's published
Q4_1 file has its tied embedding in Q8_0 for that reason). K-quants (q4_k_m) are left out for the same
reason: gguf 0.19 can read them but not write them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tunesmith.models.hf_checkpoint import family_of
from tunesmith.models.merged_weights import iter_merged_tensors, merged_config

# File type name → (tensor type of the 2-D weights, general.file_type). Values are gguf's enums
# (GGMLQuantizationType / LlamaFileType), spelled as numbers so importing this module needs no gguf.
FILE_TYPES: dict[str, tuple[int, int]] = {
    "f32": (0, 0),    # F32, ALL_F32
    "f16": (1, 1),    # F16, MOSTLY_F16
    "bf16": (30, 32),  # BF16, MOSTLY_BF16
    "q8_0": (8, 7),   # Q8_0, MOSTLY_Q8_0
    "q4_0": (2, 2),   # Q4_0, MOSTLY_Q4_0
    "q4_1": (3, 3),   # Q4_1, MOSTLY_Q4_1
}
F32, F16, Q8_0 = 0, 1, 8


def gguf_file_name(file_type: str) -> str:
    """``model-<type>.gguf``: the name every export uses for one file type."""
    return f"model-{file_type}.gguf"


def tensor_type(gguf_name: str, shape: tuple[int, ...], file_type: str, tied: bool) -> int:
    """The GGML type llama.cpp's converter / quantizer gives ``gguf_name`` in a ``file_type`` file.

    Args:
        gguf_name: The tensor's GGUF name (``blk.0.attn_q.weight``).
        shape: Its shape, rows first ([out, in]).
        file_type: A key of ``FILE_TYPES``.
        tied: The file has no ``output.weight``: ``token_embd.weight`` is also the output head.
    """
    import gguf

    weights = FILE_TYPES[file_type][0]
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return F32
    is_head = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
    if file_type in ("q4_0", "q4_1") and is_head:
        weights = Q8_0
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(weights)][0]
    return weights if shape[-1] % block == 0 else F16


def _add_metadata(writer: Any, key: str, value: Any) -> None:
    """One metadata entry, typed the way llama.cpp reads it (counts/ids uint32, floats float32,
    token types int32)."""
    import gguf

    t = gguf.GGUFValueType
    if isinstance(value, bool):
        writer.add_key_value(key, value, t.BOOL)
    elif isinstance(value, int):
        writer.add_key_value(key, value, t.UINT32)
    elif isinstance(value, float):
        writer.add_key_value(key, value, t.FLOAT32)
    elif isinstance(value, str):
        writer.add_key_value(key, value, t.STRING)
    elif isinstance(value, (list, tuple)):
        first = value[0] if value else ""
        sub = t.STRING if isinstance(first, str) else t.FLOAT32 if isinstance(first, float) else t.INT32
        writer.add_key_value(key, list(value), t.ARRAY, sub_type=sub)
    else:
        raise TypeError(f"GGUF metadata {key!r}: cannot store a {type(value).__name__}")


def _to_numpy(w: Tensor) -> np.ndarray:
    return w.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def _in_order(tensors: Iterable[tuple[str, Tensor]], order: list[str], known: Mapping[str, Any]) -> Iterator[tuple[str, Tensor]]:
    """Yield the ``order`` names' tensors in that order; a stream already in order is passed straight
    through (nothing held), one that is not is buffered only as far as needed."""
    pending: dict[str, Tensor] = {}
    want = iter(order)
    nxt = next(want, None)
    for name, w in tensors:
        if name not in known:
            raise KeyError(f"tensor stream yielded {name!r}, which is not a parameter of this model")
        if name not in order or name in pending:
            continue  # a tied weight's second name (its file stores it once), or a repeat
        pending[name] = w
        while nxt is not None and nxt in pending:
            yield nxt, pending.pop(nxt)
            nxt = next(want, None)
    if nxt is not None:
        raise ValueError(f"tensor stream ended before {nxt!r} (and {len(order)} tensors were expected in all)")


def save_gguf(
    model: nn.Module,
    path: str | Path,
    file_type: str = "q8_0",
    *,
    tokenizer: Mapping[str, Any],
    tensors: Iterable[tuple[str, Tensor]] | None = None,
    name: str | None = None,
) -> Path:
    """Write ``model`` (merged) as a GGUF file llama.cpp and Ollama run, with its tokenizer and chat template.

    The file is written under a temporary name and renamed into place when complete.

    Args:
        model: A native model (Llama, Gemma, Qwen, Mistral, Phi-3), optionally with LoRA layers (dense or
            NF4 bases).
        path: The ``.gguf`` file to write.
        file_type: ``f32``, ``f16``, ``bf16``, ``q8_0``, ``q4_0`` or ``q4_1`` (see ``tensor_type`` for
            which tensors keep a wider type).
        tokenizer: The ``tokenizer.*`` metadata, from ``tunesmith.data.gguf_vocab.gguf_tokenizer_metadata``
            (vocabulary padded to the model's ``vocab_size``).
        tensors: The merged weights as (our parameter name, dense tensor) pairs, one at a time, in
            ``model.named_parameters()`` order (other orders work but are buffered); adapter tensors
            must not appear and a tied weight may appear under both names. Default:
            ``merged_weights.iter_merged_tensors(model)`` (LoRA folded in, NF4 dequantized, one
            tensor at a time; collective for an FSDP-sharded model, so every rank calls this then).
        name: ``general.name`` in the file (what llama.cpp and Ollama show).

    Returns:
        ``path`` as a Path.

    Raises:
        ValueError: an unknown ``file_type``, a vocabulary whose size differs from the model's, or a
            model the family's GGUF layout cannot express (see its ``config_to_gguf``).
    """
    import gguf

    if file_type not in FILE_TYPES:
        raise ValueError(f"GGUF type {file_type!r} is not supported; choose from {', '.join(FILE_TYPES)}")
    family = family_of(model)
    if not hasattr(family, "config_to_gguf"):
        raise ValueError(f"{type(model).__name__}: no GGUF writer for this family yet "
                         f"({family.__name__} lacks config_to_gguf / ours_to_gguf / to_gguf_tensor)")
    cfg = merged_config(model)  # untied when a LoRA update sits on a tied head
    meta = family.config_to_gguf(cfg)
    n_tokens = len(tokenizer.get("tokenizer.ggml.tokens", ()))
    if n_tokens != cfg.vocab_size:
        raise ValueError(f"the tokenizer metadata has {n_tokens} tokens but the model's vocab_size is {cfg.vocab_size}; "
                         "build it with gguf_tokenizer_metadata(tokenizer, vocab_size=model.config.vocab_size)")
    names = family.ours_to_gguf(cfg)  # our name → GGUF name, for every tensor the file stores
    params = dict(model.named_parameters(remove_duplicate=False))
    order = [n for n in params if n in names]
    extra = family.extra_gguf_tensors(cfg)
    tied = "output.weight" not in names.values()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, meta.pop("general.architecture"))
    try:
        _add_metadata(writer, "general.type", "model")
        _add_metadata(writer, "general.name", name or "tunesmith fine-tune")
        _add_metadata(writer, "general.file_type", FILE_TYPES[file_type][1])
        _add_metadata(writer, "general.quantization_version", gguf.GGML_QUANT_VERSION)
        for key, value in [*meta.items(), *tokenizer.items()]:
            _add_metadata(writer, key, value)

        plan: dict[str, int] = {}  # GGUF name → tensor type, in file order
        shapes = {g: tuple(t.shape) for g, t in extra.items()} | {names[o]: tuple(params[o].shape) for o in order}
        for gguf_name, shape in shapes.items():
            qtype = plan[gguf_name] = tensor_type(gguf_name, shape, file_type, tied)
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
            nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), nbytes, raw_dtype=gguf.GGMLQuantizationType(qtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()

        def write(gguf_name: str, w: Tensor) -> None:
            writer.write_tensor_data(gguf.quants.quantize(_to_numpy(w), gguf.GGMLQuantizationType(plan[gguf_name])))

        for gguf_name, w in extra.items():
            write(gguf_name, w)
        with torch.no_grad():
            for our, w in _in_order(iter_merged_tensors(model) if tensors is None else tensors, order, params):
                write(names[our], family.to_gguf_tensor(our, w, cfg))
                del w  # the stream's tensor is freed before the next is made
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return path
