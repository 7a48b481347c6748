"""FSDP2 for every recipe: what to shard, loading straight into shards, the global gradient norm.

    load_for_training: meta device ─► LoRA adapters (NF4 shells for QLoRA) ─► fully_shard per block + root
                       ─► each rank reads only its rows (NF4: quantized on the spot with the global scale mean)
    train: every micro-batch's backward reduce-scatters into the sharded gradients ; clip_grad_norm (global)
    checkpoints of small states: full_tensor (gather) / shard_like (split a full tensor the way FSDP does)

Gradient accumulation reduce-scatters every micro-batch (FSDP2's default): each rank keeps only its
1/W of every gradient between micro-batches. FSDP2's no-sync alternative (``set_requires_gradient_sync
(False)`` on inner micro-batches) would keep every gradient unsharded, in ``reduce_dtype``, until the
step's last micro-batch (~280 GB per GPU for a 70B full fine-tune): we do not offer it.

Without torchrun the model stays a plain module on one device and these helpers are no-ops, so the
distributed recipes also run as one process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from tunesmith.training.config import ConfigError
from tunesmith.training.process_group import DistEnv, barrier, sum_tensor_over_ranks


def check_sharding(cfg: Any, sharded: bool, world_size: int) -> None:
    """Refuse, before anything loads, the options a launch cannot honour (each named, with what to do).

    ``tune-run`` calls this before it starts torchrun, the recipes again when they start.

    Raises:
        ConfigError: an FSDP-only option without torchrun; 8-bit AdamW on FSDP's shards; a global
            micro-batch that does not split over the processes.
    """
    fsdp_only = {"compute_dtype": cfg.compute_dtype, "reduce_dtype": cfg.reduce_dtype, "cpu_offload": cfg.cpu_offload}
    if not sharded and any(fsdp_only.values()):
        set_keys = ", ".join(k for k, v in fsdp_only.items() if v)
        raise ConfigError(f"{set_keys} need FSDP: launch with torchrun, e.g. `tune-run RECIPE --config ... "
                          "--nproc-per-node 1`")
    if sharded and cfg.optimizer != "adamw":
        raise ConfigError(f"optimizer={cfg.optimizer}: bitsandbytes' 8-bit AdamW cannot step FSDP's DTensor shards; "
                          "use optimizer=adamw (sharding already splits the optimizer state over the processes)")
    if cfg.batch_size % world_size:
        raise ConfigError(f"config key 'batch_size' = {cfg.batch_size} must be a multiple of the number of processes "
                          f"({world_size}): it is the global micro-batch, each process takes batch_size / processes of it")


def sharding_options(cfg: Any, env: DistEnv) -> dict[str, Any]:
    """``shard_model`` keyword arguments from a config's ``ShardingOptions``, checked against the launch.

    Raises:
        ConfigError: see ``check_sharding``.
    """
    from tunesmith.training.setup import select_dtype

    check_sharding(cfg, env.sharded, env.world_size)
    if not env.sharded:
        return {}
    compute = select_dtype(cfg.compute_dtype, env.device) if cfg.compute_dtype else None
    reduce = select_dtype(cfg.reduce_dtype, env.device) if cfg.reduce_dtype else None
    return {"param_dtype": compute, "reduce_dtype": reduce, "cpu_offload": cfg.cpu_offload,
            "reshard_after_forward": cfg.reshard_after_forward}


def shard_model(
    model: nn.Module,
    env: DistEnv,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """FSDP2: ``fully_shard`` every transformer block, then the root (embedding, final norm, head).

    One FSDP unit per block means only one block's full weights exist at a time (all-gathered
    just before it runs, freed after; the next block's gather overlaps); the root unit holds the
    rest and stays gathered from the forward to the end of the backward. ``hidden_states`` is
    registered as a forward method so calling it (rather than ``model(...)``) still triggers the
    root's all-gather; the loss then calls ``model.logits`` while the root is still gathered.
    Frozen weights (LoRA's base, NF4 or dense) are sharded like trainable ones; only the adapters
    get gradients.

    Args:
        model: A model with ``layers`` (blocks) and ``hidden_states`` (our families).
        env: From ``init_distributed``; must be sharded.
        param_dtype: Compute dtype the weights are all-gathered in (bf16: half the traffic);
            ``None`` keeps the stored dtype. NF4 weights are gathered as NF4 and dequantized to
            the activations' dtype inside each matmul.
        reduce_dtype: Dtype of the gradient reduce-scatter (fp32 is more accurate for bf16 compute).
        cpu_offload: Keep sharded weights, gradients and optimizer state in CPU memory; weights
            go to the GPU only while their block runs (slow, but fits much larger models).
        reshard_after_forward: Free each block's gathered weights after its forward (ZeRO-3);
            ``False`` keeps them until backward (ZeRO-2-like: more memory, less communication).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    kwargs: dict[str, Any] = {"mesh": env.mesh, "mp_policy": MixedPrecisionPolicy(param_dtype, reduce_dtype)}
    if cpu_offload:  # pinned host memory speeds up the copies to a GPU (and needs one)
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=env.device.type == "cuda")
    for block in model.layers:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, **kwargs)
    register_fsdp_forward_method(model, "hidden_states")
    return model


def reshard(model: nn.Module) -> None:
    """Free every all-gathered weight (the root stays gathered after an eval-only forward)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip by the norm of ALL gradients (every rank's shards together); returns the norm before.

    With FSDP each rank holds slices of each gradient, so the per-tensor norms are partial sums;
    ``full_tensor()`` adds them up across ranks before the clip factor is applied. On one process
    this is ``torch.nn.utils.clip_grad_norm_``; ``max_norm`` 0 only measures.
    """
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


# ------------------------------------------------------------------------------------------------
# Full tensors ↔ shards (checkpoints of small states: adapters and their optimizer state)
# ------------------------------------------------------------------------------------------------
def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor: gathered from every rank for a DTensor (collective), ``t`` itself otherwise."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def own_rows(global_rows: int, env_or_rank: DistEnv | tuple[int, int]) -> tuple[int, int]:
    """FSDP2 splits dim 0 like ``torch.chunk``: rank r gets rows [r·c, min((r+1)·c, n)), c = ceil(n/W)."""
    rank, world = (env_or_rank.rank, env_or_rank.world_size) if isinstance(env_or_rank, DistEnv) else env_or_rank
    per = -(-global_rows // world)
    start = min(rank * per, global_rows)
    return start, min(start + per, global_rows)


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` split the way ``like`` (a parameter) is: this rank's rows as a DTensor, or ``full`` as is.

    Only local slicing, no communication (every rank holds ``full``, read from the same file).
    """
    if not isinstance(like, DTensor) or full.dim() == 0 or full.shape != like.shape:
        return full
    mesh = like.device_mesh
    start, end = own_rows(full.shape[0], (mesh.get_local_rank(), mesh.size()))
    local = like.to_local()
    rows = full[start:end].to(device=local.device, dtype=full.dtype)
    return DTensor.from_local(rows, mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride())


def copy_full_into(param: Tensor, full: Tensor) -> None:
    """Copy a whole tensor into ``param``, or only this rank's rows into a sharded one."""
    with torch.no_grad():
        if isinstance(param, DTensor):
            start, end = own_rows(full.shape[0], (param.device_mesh.get_local_rank(), param.device_mesh.size()))
            param.to_local().copy_(full[start:end])
        else:
            param.copy_(full)


# ------------------------------------------------------------------------------------------------
# Loading: meta device → LoRA → shard → every rank reads only its rows
# ------------------------------------------------------------------------------------------------
@dataclass
class _Source:
    """A checkpoint as (our name, shape, read rows [start, end) as a tensor) triples, and the model it makes."""

    family: Any
    cls: type[nn.Module]
    cfg: Any
    tensors: list[tuple[str, tuple[int, ...], Callable[[int, int], Tensor]]]
    where: str


def _hf_source(source: str, env: DistEnv) -> _Source:
    """A safetensors checkpoint: each rank's ``get_slice`` reads only the bytes of its rows."""
    from safetensors import safe_open

    from tunesmith.models.hf_checkpoint import CheckpointFormatError, read_config, resolve_model_dir, safetensors_files

    if env.local_rank != 0:  # local rank 0 downloads a Hub id first; the others then hit the cache
        barrier(env)
    model_dir = resolve_model_dir(source)
    if env.local_rank == 0:
        barrier(env)
    d, family, cls = read_config(model_dir)
    try:
        cfg = family.config_from_hf(d)
    except ValueError as e:
        raise CheckpointFormatError(f"{model_dir / 'config.json'}: {e}") from e
    table = family.hf_to_ours(cfg)
    files = safetensors_files(model_dir)
    unknown = sorted(set(files) - set(table))
    if unknown:
        raise CheckpointFormatError(f"{model_dir}: unexpected tensor(s) not used by this model: {unknown[:10]}")

    def reader(path: Path, hf_name: str) -> Callable[[int, int], Tensor]:
        def read(start: int, end: int) -> Tensor:
            with safe_open(path, framework="pt") as f:  # memory-mapped: a slice reads only its bytes
                return f.get_slice(hf_name)[start:end]
        return read

    by_file: dict[Path, list[str]] = {}
    for hf_name, path in files.items():
        if table[hf_name] is not None:  # tensors the family table skips (None) are never read
            by_file.setdefault(path, []).append(hf_name)
    tensors = []
    for path, hf_names in by_file.items():  # each file's header once
        with safe_open(path, framework="pt") as f:
            tensors += [(table[n], tuple(f.get_slice(n).get_shape()), reader(path, n)) for n in hf_names]
    return _Source(family, cls, cfg, tensors, str(model_dir))


def _gguf_source(path: str) -> _Source:
    """A GGUF file: small (the demo models), so each rank dequantizes a whole tensor and keeps its rows."""
    import gguf

    from tunesmith.models.gguf_loader import config_from_reader, dequantize_tensor

    reader = gguf.GGUFReader(path)
    family, cls, cfg = config_from_reader(reader, path)
    names = family.gguf_to_ours(cfg)

    def rows(t: Any, ours: str) -> Callable[[int, int], Tensor]:
        return lambda start, end: family.fix_gguf_tensor(ours, dequantize_tensor(t), cfg)[start:end]

    tensors = [(names[t.name], tuple(int(n) for n in reversed(t.shape)), rows(t, names[t.name]))
               for t in reader.tensors if names.get(t.name)]
    return _Source(family, cls, cfg, tensors, path)


def load_sharded(
    source: str,
    dtype: torch.dtype,
    env: DistEnv,
    *,
    lora: Any = None,
    quantize_base: bool = False,
    seed: int = 0,
    trainable: bool = True,
    **shard_kwargs: Any,
) -> nn.Module:
    """Build the model on the meta device, add adapters, shard it, then fill each rank's shard.

    Each rank reads only the rows of dim 0 that it owns: ``get_slice`` on the memory-mapped
    safetensors files (a ``.gguf`` file is small: each rank dequantizes a tensor whole and keeps
    its rows), so no process ever holds a full copy and a 70B model loads on GPUs whose hosts could
    not hold it either. We chose this over "rank 0 reads and broadcasts" because it needs no
    full-size staging buffer on rank 0 and reads in parallel; the price is that every rank needs
    the files (a shared or node-local copy; a Hub id is downloaded once per node).

    QLoRA: the adapted layers' weights are NF4 from the start (meta shells that ``fully_shard``
    splits by rows); each rank quantizes its rows as it reads them, with the one number that
    depends on the whole matrix, the mean block scale, summed from every rank's row sums
    (``nf4.row_scale_sums``): the shards are exactly the rows of the one-process NF4 tensor.
    LoRA's ``A`` comes from ``lora_a_init`` (each rank draws a layer's whole A and keeps its rows),
    ``B`` is zero: the same start as on one device.

    Args:
        source: Local HF directory, Hub repo id, or ``.gguf`` file.
        dtype: Dtype of the sharded weights (NF4: the dtype it dequantizes to).
        env: The process group; must be sharded.
        lora: ``LoRAOptions`` (targets, rank, alpha, dropout) to add adapters; ``None``: none.
        quantize_base: NF4 base weights for the adapted layers.
        seed: Seeds the adapters' ``A``.
        trainable: Without ``lora``: whether every weight trains (full fine-tune) or none does
            (a frozen reference copy). With ``lora`` only the adapters train.
        **shard_kwargs: Passed to ``shard_model`` (mixed precision, CPU offload).

    Raises:
        ConfigError: an NF4 layer whose rows do not split evenly over the processes.
        CheckpointFormatError: a tensor that does not fit the model, or one that is missing.
    """
    from tunesmith.models import apply_lora, nf4
    from tunesmith.models.hf_checkpoint import CheckpointFormatError
    from tunesmith.models.lora import LoRALinear, lora_a_init

    src = _gguf_source(source) if source.endswith(".gguf") else _hf_source(source, env)
    with torch.device("meta"):
        model = src.cls(src.cfg).to(dtype)
    if lora is not None:
        apply_lora(model, list(lora.targets), rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                   quantize_base=quantize_base, seed=seed)
    else:
        model.requires_grad_(trainable)
    adapters = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    for name, m in adapters.items():
        if m.is_quantized:
            try:
                nf4.check_shardable(tuple(m.weight.shape), env.world_size, f"{name}.weight")
            except ValueError as e:
                raise ConfigError(str(e)) from None
    shard_model(model, env, **shard_kwargs)
    # Offloaded shards live on the CPU; FSDP moves them to the GPU only while a block runs.
    model.to_empty(device="cpu" if shard_kwargs.get("cpu_offload") else env.device)
    model.reset_buffers()
    for module in model.modules():  # RoPE tables belong where the compute runs, also with offloaded weights
        for key, buf in module.named_buffers(recurse=False):
            setattr(module, key, buf.to(env.device))

    params = dict(model.named_parameters())
    loaded: set[str] = set()
    with torch.no_grad():
        for ours, shape, read in src.tensors:
            param = params[ours]
            if shape != tuple(param.shape):
                raise CheckpointFormatError(
                    f"{src.where}: tensor for {ours!r} has shape {shape} but the model expects {tuple(param.shape)}; "
                    "does the config belong to these weights?")
            local = param.to_local()
            start, end = own_rows(shape[0], env)
            rows = read(start, end).to(device=local.device, dtype=dtype)
            if nf4.is_nf4(local):
                _assign_nf4_rows(model, ours, param, rows, env)
            else:
                local.copy_(rows)
            loaded.add(ours)
        for name, m in adapters.items():
            a = lora_a_init(name, tuple(m.lora_a.weight.shape), seed)
            copy_full_into(m.lora_a.weight, a.to(dtype))
            m.lora_b.weight.to_local().zero_()
            loaded |= {f"{name}.lora_a.weight", f"{name}.lora_b.weight"}
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointFormatError(f"{src.where}: checkpoint lacks tensor(s) for {missing[:10]}")
    return model


def _assign_nf4_rows(model: nn.Module, name: str, param: DTensor, rows: Tensor, env: DistEnv) -> None:
    """Quantize this rank's rows of an NF4 weight with the whole weight's scale mean; put them in place."""
    from tunesmith.models import nf4

    out, width = param.shape
    sums = torch.zeros(out, dtype=torch.float64, device=rows.device)
    start, end = own_rows(out, env)
    sums[start:end] = nf4.row_scale_sums(rows)
    sums = sum_tensor_over_ranks(sums, env)  # one contributor per entry: exact, the same on every rank
    shard = nf4.to_nf4(rows, name, mean=nf4.scale_mean(sums, out * width // nf4.BLOCK_SIZE, rows.dtype))
    owner_name, _, attr = name.rpartition(".")
    weight = nn.Parameter(DTensor.from_local(shard, param.device_mesh, param.placements, run_check=False,
                                             shape=param.shape, stride=param.stride()), requires_grad=False)
    # assign=True swaps the parameter; FSDP2's load hook re-points its shard bookkeeping at it.
    model.get_submodule(owner_name).load_state_dict({attr: weight}, strict=False, assign=True)


def load_for_training(
    model: str,
    tokenizer: str | None,
    chat_template: str | None,
    dtype: torch.dtype,
    env: DistEnv,
    *,
    lora: Any = None,
    quantize_base: bool = False,
    seed: int = 0,
    **shard_kwargs: Any,
) -> Any:
    """The base model (adapters added when ``lora`` is given, else every weight trainable) and its tokenizer.

    One process: ``setup.load_model_and_tokenizer`` (+ ``apply_lora``), exactly as the single-device
    recipes load. Several: the tokenizer the same way, the weights through ``load_sharded``.

    Returns:
        ``setup.Pretrained`` (model, tokenizer, source, tokenizer_dir).
    """
    from tunesmith.models import apply_lora
    from tunesmith.training.setup import Pretrained, load_model_and_tokenizer, load_tokenizer_with_template, resolve_source

    if not env.sharded:
        nf4_targets = list(lora.targets) if lora is not None and quantize_base else []
        base = load_model_and_tokenizer(model, tokenizer, dtype, env.device, chat_template, nf4_targets)
        if lora is not None:
            apply_lora(base.model, list(lora.targets), rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                       quantize_base=quantize_base, seed=seed)
        else:
            base.model.requires_grad_(True)
    else:
        source, tok_source = resolve_source(model), resolve_source(tokenizer or model)
        tok = load_tokenizer_with_template(tok_source, chat_template)
        net = load_sharded(source, dtype, env, lora=lora, quantize_base=quantize_base, seed=seed, **shard_kwargs)
        base = Pretrained(net, tok, source, tok_source if Path(tok_source).is_dir() else None)
    if base.tokenizer_dir is None and tokenizer is None and not base.source.endswith(".gguf"):
        from tunesmith.models.hf_checkpoint import resolve_model_dir

        # A Hub id: its downloaded snapshot holds the tokenizer files the HF export copies.
        base.tokenizer_dir = str(resolve_model_dir(base.source))
    return base


def frozen_copy(model: nn.Module, source: str, dtype: torch.dtype, env: DistEnv, **shard_kwargs: Any) -> nn.Module:
    """A frozen copy of the starting model (DPO's reference for a full-weights policy), sharded like it.

    One process: a deep copy. Several: the checkpoint loaded a second time into its own shards
    (an FSDP model cannot be deep-copied), so each rank holds 1/W of the copy.
    """
    import copy

    if not env.sharded:
        return copy.deepcopy(model).eval().requires_grad_(False)
    return load_sharded(source, dtype, env, trainable=False, **shard_kwargs).eval()


def sharded_nbytes(model: nn.Module) -> dict[str, int]:
    """Bytes this rank stores, by kind: ``nf4`` (NF4 shards), ``dense`` (other parameters' shards)."""
    from tunesmith.models import nf4

    out = {"nf4": 0, "dense": 0}
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        out["nf4" if nf4.is_nf4(local) else "dense"] += nf4.nbytes(local)
    return out

