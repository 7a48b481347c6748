"""LoRA adapters in the PEFT layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

A PEFT adapter names its tensors after the HF module they attach to, e.g.

    ours: layers.0.attn.q_proj.lora_a.weight
    PEFT: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight

We derive that from the family's HF table (``hf_to_ours``): the base weight
``layers.0.attn.q_proj.weight`` is HF ``model.layers.0.self_attn.q_proj.weight``, so its adapter
is that module name + ``.lora_A.weight`` under PEFT's ``base_model.model.`` prefix. PEFT's
``lora_A`` / ``lora_B`` are our ``lora_a`` / ``lora_b`` with the same [r, in] / [out, r] shapes,
and its default scaling is ours, ``lora_alpha / r``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tunesmith.models.hf_checkpoint import CheckpointFormatError, family_of
from tunesmith.models.lora import LoRALinear, apply_lora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _module_names(model: nn.Module) -> dict[str, str]:
    """Our module name (``layers.0.attn.q_proj``) → HF module name (``model.layers.0.self_attn.q_proj``)
    for every layer whose ``.weight`` appears in the family's HF table."""
    names = dict(family_of(model).hf_to_ours(model.config))
    # On tied models the table skips lm_head (its weight is the embedding); an adapter on the
    # output head still needs the name. Every HF causal-LM calls its head lm_head.
    names["lm_head.weight"] = "output.weight"
    return {
        ours.removesuffix(".weight"): hf.removesuffix(".weight")
        for hf, ours in names.items()
        if ours is not None and ours.endswith(".weight")
    }


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def save_peft_adapter(
    model: nn.Module,
    out_dir: str | Path,
    *,
    base_model: str,
    rank: int,
    alpha: float,
    dropout: float,
    targets: list[str],
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model``'s LoRA adapters so ``peft.PeftModel.from_pretrained(hf_model, out_dir)`` loads them.

    Args:
        model: A native model with ``LoRALinear`` layers (from ``apply_lora``).
        out_dir: Directory to create/fill.
        base_model: Hub id or path of the base model, stored as ``base_model_name_or_path``.
        rank: LoRA rank (PEFT ``r``).
        alpha: LoRA alpha (PEFT ``lora_alpha``).
        dropout: Adapter dropout (PEFT ``lora_dropout``).
        targets: Our target leaf names; ``output`` is written as HF's ``lm_head``.
        tensors: The adapter tensors under our names (``lora_state_dict``), when ``model`` holds only
            shards of them (FSDP: gathered first); default: read from ``model``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ValueError: the model has no LoRA layers, or a layer's rank/scaling differs from the
            arguments (PEFT would rebuild it with the wrong shape or scale).
    """
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to save; call apply_lora first")
    to_hf = _module_names(model)
    own = tensors if tensors is not None else {f"{n}.{ab}.weight": getattr(m, ab).weight for n, m in layers.items()
                                               for ab in ("lora_a", "lora_b")}
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        if layer.rank != rank or abs(layer.scaling - alpha / rank) > 1e-12:
            raise ValueError(
                f"{name}: LoRA rank {layer.rank} / alpha {layer.alpha} differ from rank={rank}, alpha={alpha}"
            )
        if layer.merged:
            raise ValueError(f"{name}: adapter is merged into the base weight; unmerge() before saving it separately")
        hf = PEFT_PREFIX + to_hf[name]
        out[f"{hf}.lora_A.weight"] = own[f"{name}.lora_a.weight"].detach().to("cpu").contiguous()
        out[f"{hf}.lora_B.weight"] = own[f"{name}.lora_b.weight"].detach().to("cpu").contiguous()

    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted("lm_head" if t == "output" else t for t in targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """Parse ``adapter_config.json`` and refuse PEFT options our ``LoRALinear`` does not implement."""
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointFormatError(f"{adapter_dir}: no {ADAPTER_CONFIG} (is this a PEFT adapter directory?)")
    cfg = json.loads(path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointFormatError(f"{path}: peft_type {cfg['peft_type']!r} is not supported (only LORA)")
    for key, plain in (("use_rslora", False), ("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False)):
        if cfg.get(key, plain) != plain:
            raise CheckpointFormatError(f"{path}: {key} = {cfg[key]!r} is not supported (only {plain!r})")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise CheckpointFormatError(f"{path}: per-layer {key} is not supported (one rank and alpha for all layers)")
    if not isinstance(cfg.get("target_modules"), list):
        raise CheckpointFormatError(
            f"{path}: target_modules must be a list of module names, got {cfg.get('target_modules')!r}"
        )
    return cfg


def load_peft_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Load a PEFT LoRA adapter into ``model`` (in place), adding LoRA layers first if it has none.

    Args:
        model: A native model, plain (LoRA is applied from ``adapter_config.json``) or already
            carrying LoRA layers with matching rank and targets.
        adapter_dir: Directory with ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
        The same model.

    Raises:
        CheckpointFormatError: unsupported PEFT options, a rank/alpha or shape mismatch, or adapter
            tensors that do not match the model's LoRA layers (each names the file and key).
    """
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    rank, alpha = cfg["r"], cfg["lora_alpha"]
    if not _lora_layers(model):
        targets = ["output" if t == "lm_head" else t for t in cfg["target_modules"]]
        apply_lora(model, targets, rank=rank, alpha=alpha, dropout=cfg.get("lora_dropout", 0.0))

    layers = _lora_layers(model)
    to_hf = _module_names(model)
    # PEFT key → (our layer name, "lora_a" | "lora_b")
    wanted = {
        f"{PEFT_PREFIX}{to_hf[name]}.lora_{ab.upper()}.weight": (name, f"lora_{ab}")
        for name in layers
        for ab in ("a", "b")
    }
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointFormatError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (only safetensors adapters are loaded)")
    seen: set[str] = set()
    with safe_open(path, framework="pt") as f, torch.no_grad():
        for key in f.keys():
            # PEFT saves under the adapter name in some versions ("...lora_A.default.weight").
            norm_key = key.replace(".default.weight", ".weight")
            if norm_key not in wanted:
                raise CheckpointFormatError(f"{path}: tensor {key!r} matches no LoRA layer of this model")
            name, which = wanted[norm_key]
            layer = layers[name]
            if layer.rank != rank or abs(layer.scaling - alpha / rank) > 1e-12:
                raise CheckpointFormatError(
                    f"{path}: adapter has r={rank}, lora_alpha={alpha} but layer {name!r} has "
                    f"rank {layer.rank}, alpha {layer.alpha}"
                )
            param = getattr(layer, which).weight
            tensor = f.get_tensor(key)
            if tensor.shape != param.shape:
                raise CheckpointFormatError(
                    f"{path}: tensor {key!r} has shape {tuple(tensor.shape)} but {name}.{which}.weight "
                    f"expects {tuple(param.shape)}"
                )
            param.copy_(tensor)
            seen.add(norm_key)
    missing = sorted(set(wanted) - seen)
    if missing:
        raise CheckpointFormatError(f"{path}: adapter lacks tensor(s) {missing[:6]} for this model's LoRA layers")
    return model
