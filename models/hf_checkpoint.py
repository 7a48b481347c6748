"""Hugging Face checkpoints in and out, for any model family.

    load_hf_checkpoint(dir)                     save_hf_checkpoint(model, dir)
      config.json ─► family.config_from_hf        family.config_to_hf ─► config.json
      *.safetensors, tensor by tensor               iter_merged_tensors, file by file
        └─ HF name ─► family.hf_to_ours ─► our parameter ─► HF name ─┘

Nothing here knows what a Llama is: each family supplies a small conversion module
(``models/llama_hf.py`` is the model) with

* ``config_from_hf(d: dict) -> config`` and ``config_to_hf(config) -> dict``;
* ``hf_to_ours(config) -> dict[str, str | None]``: every HF parameter name → our state-dict name
  (``None`` means "present in some files, not loaded");

and a model class built as ``cls(config)``. ``HF_FAMILIES`` maps ``config.json``'s ``model_type``
to that pair; adding a family is one line per ``model_type``. Mixture-of-experts and multimodal
checkpoints (``OUT_OF_SCOPE``) are refused by name. A model class may define
``reset_buffers()`` (recompute non-persistent buffers such as RoPE tables); it is then built on
the meta device, so loading neither random-initialises the weights nor holds a second copy.

Weights are only ever read from safetensors. Pickle-based ``.bin``/``.pt`` checkpoints can run
arbitrary code when loaded, so they are refused with a pointer to converting them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from tunesmith.models import gemma_hf, llama_hf, mistral_hf, nf4, phi3_hf, qwen_hf
from tunesmith.models.gemma import Gemma
from tunesmith.models.host_memory import return_freed_host_memory
from tunesmith.models.llama import Llama
from tunesmith.models.mistral import Mistral
from tunesmith.models.phi3 import Phi3
from tunesmith.models.qwen import Qwen
from tunesmith.models.safetensors_stream import SafetensorsStream

# model_type in config.json → (conversion module, model class). One line per model_type.
# Llama's subclasses come before Llama: a model is saved by the first class it is an instance of.
HF_FAMILIES: dict[str, tuple[ModuleType, type[nn.Module]]] = {
    "qwen2": (qwen_hf, Qwen),  # Qwen2 and Qwen2.5
    "qwen3": (qwen_hf, Qwen),
    "mistral": (mistral_hf, Mistral),
    "phi3": (phi3_hf, Phi3),  # Phi-3, Phi-3.5-mini, Phi-4-mini
    "llama": (llama_hf, Llama),
    "gemma": (gemma_hf, Gemma),
    "gemma2": (gemma_hf, Gemma),
    "gemma3_text": (gemma_hf, Gemma),
}
# general.architecture in a GGUF file → (conversion module, model class); see gguf_loader.py for
# what the module provides there. llama.cpp writes Mistral as "llama".
GGUF_FAMILIES: dict[str, tuple[ModuleType, type[nn.Module]]] = {
    "qwen2": (qwen_hf, Qwen),
    "qwen3": (qwen_hf, Qwen),
    "phi3": (phi3_hf, Phi3),
    "llama": (llama_hf, Llama),
    "gemma": (gemma_hf, Gemma),
    "gemma2": (gemma_hf, Gemma),
    "gemma3": (gemma_hf, Gemma),
}
# Checkpoints of these families' mixture-of-experts and multimodal relatives, refused by name (HF
# model_type or GGUF general.architecture → what it is). Dense text decoders only, for now.
OUT_OF_SCOPE: dict[str, str] = {
    "qwen2_moe": "Qwen1.5-MoE / Qwen2-MoE (mixture of experts)",
    "qwen2moe": "Qwen1.5-MoE / Qwen2-MoE (mixture of experts)",
    "qwen3_moe": "Qwen3-MoE (mixture of experts)",
    "qwen3moe": "Qwen3-MoE (mixture of experts)",
    "qwen3_next": "Qwen3-Next (hybrid attention, mixture of experts)",
    "qwen2_vl": "Qwen2-VL (vision-language)",
    "qwen2vl": "Qwen2-VL (vision-language)",
    "qwen2_5_vl": "Qwen2.5-VL (vision-language)",
    "qwen3_vl": "Qwen3-VL (vision-language)",
    "qwen3vl": "Qwen3-VL (vision-language)",
    "qwen3_vl_moe": "Qwen3-VL-MoE (vision-language, mixture of experts)",
    "qwen3vlmoe": "Qwen3-VL-MoE (vision-language, mixture of experts)",
    "qwen2_audio": "Qwen2-Audio (audio-language)",
    "qwen2_5_omni": "Qwen2.5-Omni (multimodal)",
    "phimoe": "Phi-3.5-MoE (mixture of experts)",
    "phi3_v": "Phi-3 / Phi-3.5-vision (vision-language)",
    "phi4mm": "Phi-4-multimodal",
    "phi4_multimodal": "Phi-4-multimodal",
    "mixtral": "Mixtral (mixture of experts)",
    "mistral3": "Mistral Small 3.1+ / Mistral 3 (vision-language)",
    "pixtral": "Pixtral (vision-language)",
    "llava": "LLaVA (vision-language)",
}


def out_of_scope_message(where: str, key: str, name: str) -> str:
    """The refusal for a checkpoint whose ``key`` (model_type, general.architecture) is ``name``."""
    return (
        f"{where}: {key} {name!r} is {OUT_OF_SCOPE[name]}, which is out of scope: tunesmith fine-tunes dense "
        "text decoders (Llama, Gemma, Qwen2/2.5/3, Mistral, Phi-3/Phi-4-mini), not mixture-of-experts or "
        "multimodal checkpoints"
    )

# Files a model directory needs (weights, config, tokenizer) — what a Hub download fetches.
HUB_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
]
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")


class CheckpointFormatError(ValueError):
    """A checkpoint that does not fit the model or cannot be read safely."""


# ------------------------------------------------------------------------------------------------
# Finding the files
# ------------------------------------------------------------------------------------------------
def resolve_model_dir(source: str | Path) -> Path:
    """A local model directory, or a Hub repo id downloaded into the Hugging Face cache.

    Local paths never touch the network. A repo id (``org/name``) goes through
    ``huggingface_hub.snapshot_download``, which reads the access token from ``HF_TOKEN`` (or a
    ``huggingface-cli login``) itself and honours ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE``.

    Raises:
        FileNotFoundError: ``source`` looks like a path but does not exist.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    looks_like_repo_id = isinstance(source, str) and source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if path.exists() or not looks_like_repo_id:
        raise FileNotFoundError(f"{source}: not a model directory (need config.json + *.safetensors) or a Hub repo id")
    from huggingface_hub import snapshot_download  # only needed for Hub ids

    return Path(snapshot_download(repo_id=str(source), allow_patterns=HUB_ALLOW_PATTERNS))


def safetensors_files(model_dir: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it (single file or sharded).

    Raises:
        CheckpointFormatError: no safetensors (pickle checkpoints are named and refused), or a shard
            listed in the index is missing.
    """
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
        if missing:
            raise CheckpointFormatError(
                f"{index}: shard file(s) {missing} listed in the index are missing from {model_dir}"
            )
        return {name: model_dir / f for name, f in weight_map.items()}
    single = model_dir / SAFETENSORS_SINGLE
    if not single.is_file():
        shards = sorted(model_dir.glob("*.safetensors"))
        if len(shards) == 1:
            single = shards[0]
        else:
            pickles = [
                p.name for p in model_dir.iterdir() if p.name in PICKLE_WEIGHTS or p.suffix in (".bin", ".pt", ".pth")
            ]
            hint = (
                f"found pickle checkpoint(s) {sorted(pickles)}, which tunesmith does not load (unpickling can run "
                "arbitrary code); convert them to safetensors first, e.g. load in transformers and "
                "save_pretrained(..., safe_serialization=True)"
                if pickles
                else f"expected {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}"
            )
            raise CheckpointFormatError(f"{model_dir}: no safetensors weights; {hint}")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def read_config(model_dir: Path) -> tuple[dict[str, Any], ModuleType, type[nn.Module]]:
    """Parse ``config.json`` and pick the family by its ``model_type``."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointFormatError(f"{model_dir}: no config.json (is this a Hugging Face model directory?)")
    d = json.loads(path.read_text())
    model_type = d.get("model_type")
    if model_type in OUT_OF_SCOPE:
        raise CheckpointFormatError(out_of_scope_message(str(path), "model_type", model_type))
    if model_type not in HF_FAMILIES:
        raise CheckpointFormatError(
            f"{path}: model_type {model_type!r} is not supported (supported: {sorted(HF_FAMILIES)})"
        )
    family, cls = HF_FAMILIES[model_type]
    return d, family, cls


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def build_empty(
    cls: type[nn.Module], cfg: Any, dtype: torch.dtype, device: torch.device | str, nf4_targets: Sequence[str] = ()
) -> nn.Module:
    """``cls(cfg)`` with uninitialised weights of ``dtype`` on ``device``, ready to be filled in.

    When the class can recompute its buffers (``reset_buffers``), the model is built on the meta
    device and only then given real storage, so no time goes into a random init that the
    checkpoint overwrites. Tied parameters are re-tied after ``to_empty`` (which would give each
    use its own tensor).

    Args:
        nf4_targets: Leaf names of ``nn.Linear`` layers (``q_proj``, …) whose weights will be stored
            as NF4 (QLoRA). Their weights stay on the meta device here, so no dense copy is ever
            allocated; ``load_state_into`` quantizes each one as it is read. Weights shared with
            another module (a tied output head) stay dense: the embedding needs them anyway.
    """
    if not hasattr(cls, "reset_buffers"):
        return cls(cfg).to(device=device, dtype=dtype)
    with torch.device("meta"):
        model = cls(cfg)
    # (module, attribute) of every use of each parameter, to restore sharing afterwards.
    uses: dict[int, list[tuple[nn.Module, str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owner, _, attr = name.rpartition(".")
        uses.setdefault(id(p), []).append((model.get_submodule(owner) if owner else model, attr))
    model.to(dtype=dtype)
    # Hide the weights that will be quantized from to_empty, then put the meta tensors back.
    deferred = [
        (module, module.weight)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in nf4_targets and len(uses[id(module.weight)]) == 1
    ]
    for module, _ in deferred:
        module.weight = None
    model.to_empty(device=device)
    for module, weight in deferred:
        module.weight = weight
    for sites in uses.values():
        first = getattr(*sites[0])
        for module, attr in sites[1:]:
            setattr(module, attr, first)
    model.reset_buffers()
    return model


def iter_checkpoint(files: dict[str, Path]) -> Iterator[tuple[str, Path, Tensor]]:
    """Yield (name, file, tensor) one tensor at a time, opening each shard once."""
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as f:
            for name in names:
                yield name, path, f.get_tensor(name)


def load_state_into(
    model: nn.Module,
    tensors: Iterator[tuple[str, Path, Tensor]],
    names: dict[str, str | None],
    what: str,
    device: torch.device | str = "cpu",
) -> None:
    """Copy checkpoint tensors into ``model``'s parameters, checking names and shapes.

    A parameter still on the meta device (left there by ``build_empty(..., nf4_targets)``) is
    replaced by the NF4 quantization of its tensor, cast to the parameter's dtype first (NF4
    remembers that dtype for dequantization). Only one dense tensor is alive at a time, so peak
    memory while loading stays near the quantized model's size.

    Args:
        model: Target model (its parameters are written in place, cast to their dtype).
        tensors: (checkpoint name, file, tensor) triples, e.g. from ``iter_checkpoint``.
        names: Checkpoint name → our state-dict name, or ``None`` to skip (the family table).
        what: Describes the checkpoint in errors (a directory or file path).
        device: Where quantized weights are put.

    Raises:
        CheckpointFormatError: an unknown name, a shape mismatch (naming file, key and both shapes), or
            parameters the checkpoint does not provide.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = {ours for ours in names.values() if ours is not None}
    loaded: set[str] = set()
    unknown: list[str] = []
    with torch.no_grad():
        for name, path, tensor in tensors:
            if name not in names:
                unknown.append(name)
                continue
            ours = names[name]
            if ours is None:
                continue
            param = params[ours]
            if tensor.shape != param.shape:
                raise CheckpointFormatError(
                    f"{path}: tensor {name!r} has shape {tuple(tensor.shape)} but the model's {ours!r} "
                    f"expects {tuple(param.shape)}; does config.json belong to these weights?"
                )
            if param.is_meta:
                owner, _, attr = ours.rpartition(".")
                dense = tensor.to(device=device, dtype=param.dtype)
                setattr(model.get_submodule(owner), attr, nn.Parameter(nf4.to_nf4(dense, ours), requires_grad=False))
                del dense
                return_freed_host_memory()
            else:
                param.copy_(tensor)
            loaded.add(ours)
    if unknown:
        raise CheckpointFormatError(f"{what}: unexpected tensor(s) not used by this model: {sorted(unknown)[:10]}")
    missing = sorted(expected - loaded)
    if missing:
        raise CheckpointFormatError(f"{what}: checkpoint lacks tensor(s) for {missing[:10]}")


def load_hf_checkpoint(
    source: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    nf4_targets: Sequence[str] = (),
) -> nn.Module:
    """Load a Hugging Face model directory or Hub repo id as our native model.

    Args:
        source: Local directory (``config.json`` + safetensors) or Hub repo id.
        dtype: Parameter dtype (weights are cast tensor by tensor while loading).
        device: Where the parameters live.
        nf4_targets: Leaf names of linear layers to store as NF4 while loading (QLoRA); see
            ``build_empty``. ``apply_lora(..., quantize_base=True)`` then reuses these weights.

    Returns:
        The model in eval mode.
    """
    model_dir = resolve_model_dir(source)
    d, family, cls = read_config(model_dir)
    try:
        cfg = family.config_from_hf(d)
    except ValueError as e:
        raise CheckpointFormatError(f"{model_dir / 'config.json'}: {e}") from e
    files = safetensors_files(model_dir)
    model = build_empty(cls, cfg, dtype, device, nf4_targets)
    load_state_into(model, iter_checkpoint(files), family.hf_to_ours(cfg), str(model_dir), device)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------
def family_of(model: nn.Module) -> ModuleType:
    """The conversion module for ``model``'s class (from ``HF_FAMILIES``).

    The most specific class wins: ``Qwen`` is also a ``Llama``, and FSDP2 wraps the class in a
    subclass of its own (``FSDPQwen``), hence ``isinstance`` and the MRO order.
    """
    mro = type(model).__mro__
    matches = [(mro.index(cls), family) for family, cls in HF_FAMILIES.values() if isinstance(model, cls)]
    if not matches:
        raise TypeError(f"no Hugging Face conversion for {type(model).__name__}; known: {sorted(HF_FAMILIES)}")
    return min(matches, key=lambda m: m[0])[1]


def _plan_files(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Split names into consecutive groups of at most ``max_bytes`` (a bigger tensor stands alone)."""
    files: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes:
        if files[-1] and size + nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append(name)
        size += nbytes
    return files


def save_hf_checkpoint(
    model: nn.Module,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    write_files: bool = True,
) -> Path:
    """Write ``model`` as a Hugging Face model directory that ``transformers`` and vLLM load.

    The weights come from ``merged_weights.iter_merged_tensors``, one dense tensor at a time:
    LoRA layers are saved merged (base + scaling · B A; NF4 bases dequantized) without changing
    ``model``, and each tensor is appended to its safetensors file as soon as it is made
    (``SafetensorsStream``), so the export holds one merged tensor at a time, never the merged model. A model
    sharded with FSDP2 is gathered the same way, tensor by tensor: call this on EVERY rank, with
    ``write_files`` true on rank 0 only.

    A tied model whose output head carries a LoRA update is saved untied: the merged head no
    longer equals the embedding.

    Args:
        model: A native model (optionally with ``LoRALinear`` layers, dense or NF4 bases), on one
            device or sharded by ``fully_shard``.
        out_dir: Directory to create/fill.
        dtype: dtype of the saved tensors; default: the model's embedding dtype.
        max_shard_bytes: Above this total the weights are split into
            ``model-0000x-of-0000y.safetensors`` files plus ``model.safetensors.index.json``.
        write_files: False on the ranks of a sharded model that only take part in the gathers.

    Returns:
        ``out_dir`` as a Path.
    """
    from tunesmith.models.merged_weights import iter_merged_tensors, merged_config, merged_tensor_specs

    family = family_of(model)
    cfg = merged_config(model)  # untied when a LoRA update sits on a tied head
    out_dir = Path(out_dir)
    dtype = dtype or next(model.parameters()).dtype  # the embedding's, for our models

    # Our name → the HF name(s) it is stored under, from the family table.
    to_hf: dict[str, list[str]] = {}
    for hf_name, our_name in family.hf_to_ours(cfg).items():
        if our_name is not None:
            to_hf.setdefault(our_name, []).append(hf_name)
    # The file plan from shapes alone (identical on every rank), in stream order.
    element = torch.empty((), dtype=dtype).element_size()
    sizes = [(hf, shape.numel() * element) for ours, shape, _ in merged_tensor_specs(model) for hf in to_hf.get(ours, [])]
    missing = sorted({hf for names in to_hf.values() for hf in names} - {hf for hf, _ in sizes})
    if missing:
        raise ValueError(f"{type(model).__name__} has no parameter for HF tensor(s) {missing[:5]}")
    files = _plan_files(sizes, max_shard_bytes)
    file_of = {hf: k for k, names in enumerate(files) for hf in names}
    if write_files:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in [out_dir / SAFETENSORS_SINGLE, out_dir / SAFETENSORS_INDEX, *out_dir.glob("model-*-of-*.safetensors")]:
            stale.unlink(missing_ok=True)  # a previous save with another shard count must not linger

    def file_name(k: int) -> str:
        return SAFETENSORS_SINGLE if len(files) == 1 else f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"

    # Each file's header is planned from the shapes, so each merged tensor is written the moment it
    # arrives and freed before the next is made: nothing of the merged model accumulates on the CPU.
    shapes = {hf: shape for ours, shape, _ in merged_tensor_specs(model) for hf in to_hf.get(ours, [])}
    stream: SafetensorsStream | None = None
    for ours, tensor in iter_merged_tensors(model):  # collective under FSDP: every rank iterates
        for hf in to_hf.get(ours, []) if write_files else []:
            k = file_of[hf]
            if stream is None or stream.path.name != file_name(k):
                if stream is not None:
                    stream.close()
                stream = SafetensorsStream(out_dir / file_name(k), [(n, shapes[n], dtype) for n in files[k]],
                                           metadata={"format": "pt"})
            stream.write(hf, tensor)
        del tensor
    if stream is not None:
        stream.close()
    if not write_files:
        return out_dir

    if len(files) > 1:
        index = {"metadata": {"total_size": sum(n for _, n in sizes)},
                 "weight_map": {hf: file_name(file_of[hf]) for hf, _ in sizes}}
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config = family.config_to_hf(cfg)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")  # HF's name for the weights' dtype
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
