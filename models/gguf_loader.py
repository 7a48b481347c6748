"""Load a llama.cpp GGUF file as our native model, dequantized to a plain dtype.

    GGUF metadata ─► family.config_from_gguf ─► config ─► empty model
    GGUF tensors ─► gguf.quants.dequantize ─► family.fix_gguf_tensor ─► our parameter

The ``gguf`` package (llama.cpp's own Python reader) memory-maps the file and dequantizes each
block format (Q4_1, Q8_0, K-quants, …) to float32 numpy; we convert one tensor at a time. The
family module (``HF_FAMILIES``' sibling ``GGUF_FAMILIES``, keyed by ``general.architecture``)
provides ``config_from_gguf(meta)``, ``gguf_to_ours(cfg)`` and ``fix_gguf_tensor(name, w, cfg)``
(for Llama: undo llama.cpp's Q/K row permutation; Qwen and Phi-3 files need none).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tunesmith.models.hf_checkpoint import (
    GGUF_FAMILIES, OUT_OF_SCOPE, CheckpointFormatError, build_empty, load_state_into, out_of_scope_message,
)


def read_metadata(reader: Any) -> dict[str, Any]:
    """GGUF key/value metadata as plain Python values (strings, numbers, lists).

    Args:
        reader: A ``gguf.GGUFReader``.
    """
    return {key: field.contents() for key, field in reader.fields.items()}


def dequantize_tensor(t: Any) -> Tensor:
    """One GGUF tensor as a float32 torch tensor in row-major [rows, cols] (our layout).

    GGUF lists dimensions fastest-first (``t.shape == [cols, rows]``), so the numpy array is
    reshaped to the reversed shape.
    """
    import gguf

    shape = tuple(int(n) for n in reversed(t.shape))
    values = gguf.quants.dequantize(t.data, t.tensor_type)
    # np.array copies: F32/F16 tensors come back as read-only views of the memory-mapped file.
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))


def config_from_reader(reader: Any, path: str | Path) -> tuple[Any, type[nn.Module], Any]:
    """(family module, model class, config) of an open GGUF file, from its metadata.

    Two facts live outside the metadata: a tied head is a file without ``output.weight``, and
    RoPE scaling tables are tensors — Llama 3.1/3.2's ``rope_freqs.weight`` (llama.cpp's
    per-frequency divisors), Phi-3's LongRoPE ``rope_factors_long/short.weight`` — handed to the
    family as ``meta["rope_freqs"]``, ``meta["rope_factors_long"]``, …

    Raises:
        CheckpointFormatError: unsupported architecture (mixture-of-experts and multimodal ones by
            name) or metadata the family cannot use.
    """
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch in OUT_OF_SCOPE:
        raise CheckpointFormatError(out_of_scope_message(str(path), "general.architecture", arch))
    if meta.get(f"{arch}.expert_count"):  # Mixtral is llama.cpp's "llama" with experts
        raise CheckpointFormatError(
            f"{path}: {arch}.expert_count = {meta[f'{arch}.expert_count']}: a mixture-of-experts model "
            "(e.g. Mixtral), which is out of scope: tunesmith fine-tunes dense text decoders"
        )
    if arch not in GGUF_FAMILIES:
        raise CheckpointFormatError(
            f"{path}: general.architecture {arch!r} is not supported (supported: {sorted(GGUF_FAMILIES)})"
        )
    family, cls = GGUF_FAMILIES[arch]
    tensors = {t.name: t for t in reader.tensors}
    for name, t in tensors.items():
        if name.startswith("rope_"):  # RoPE tables, not weights: rope_freqs, rope_factors_long/short
            meta[name.removesuffix(".weight")] = dequantize_tensor(t)
    try:
        cfg = family.config_from_gguf(meta)
    except (KeyError, ValueError) as e:
        raise CheckpointFormatError(f"{path}: {e}") from e
    if "output.weight" not in tensors:
        cfg = dataclasses.replace(cfg, tie_embeddings=True)
    return family, cls, cfg


def load_gguf(
    path: str | Path | Any,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    nf4_targets: Sequence[str] = (),
) -> nn.Module:
    """Build our model from a GGUF file: config from its metadata, weights dequantized.

    The output head is tied to the token embedding when the file has no ``output.weight``
    (llama.cpp's convention for tied models such as SmolLM2 and Llama 3.2).

    Args:
        path: The ``.gguf`` file, or a ``gguf.GGUFReader`` already open on it (parsing a file with a
            large vocabulary takes seconds, ~11 s for Gemma 3: the tokenizer loader can share it).
        dtype: Parameter dtype of the returned model.
        device: Where the parameters live.
        nf4_targets: Leaf names of linear layers re-quantized to NF4 as they are read (QLoRA);
            see ``hf_checkpoint.build_empty``.

    Returns:
        The model in eval mode.

    Raises:
        CheckpointFormatError: unsupported architecture, unknown tensor names or mismatched shapes.
    """
    import gguf

    if isinstance(path, gguf.GGUFReader):
        reader, path = path, Path(path.data.filename)
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: GGUF file not found")
        reader = gguf.GGUFReader(path)
    family, cls, cfg = config_from_reader(reader, path)
    names = family.gguf_to_ours(cfg)

    def tensors() -> Iterator[tuple[str, Path, Tensor]]:
        for t in reader.tensors:  # one dequantized tensor alive at a time
            w = dequantize_tensor(t)
            ours = names.get(t.name)
            yield t.name, path, family.fix_gguf_tensor(ours, w, cfg) if ours else w

    model = build_empty(cls, cfg, dtype, device, nf4_targets)
    load_state_into(model, tensors(), names, str(path), device)
    return model.eval()
