"""Expected peak memory of a run, per rank, before renting the GPUs: ``tune-run RECIPE --config X --dry-run``.

    peak ≈ runtime + weights + NF4 weights + adapters (+ grads) + gradients + optimizer state
           + all-gathered weights (FSDP) + reference (DPO) + activations + logits

Each term is counted from the model's shape alone (``config.json`` or GGUF metadata is read; no
weights are loaded):

* weights: every parameter once (tied ones once) in the run's dtype; NF4 layers at 4 bits per
  value plus one int8 scale per 64 values (``models/nf4.py``).
* adapters: A [r, in] and B [out, r] per adapted layer, plus their gradients, in the run's dtype.
* optimizer: AdamW keeps two moments per trainable value in the parameter dtype; the 8-bit
  variants keep one byte each (tensors under 4096 values stay 32-bit, as bitsandbytes does).
* activations: what autograd saves for backward, per token per layer (counted for our Llama block
  with the saved-tensor hooks in tests/test_memory_estimate.py): the two RMSNorms' inputs and
  outputs, SDPA's q, k, v and output (with ``attention: matmul`` also the [s × s] probabilities), SwiGLU's gate, up and silu(gate), the adapters' rank-r
  middles. Frozen linear layers save no input (no weight gradient). With activation checkpointing
  only each block's input is kept, plus one block's activations while it is recomputed.
* logits: the cross-entropy's fp32 log-softmax and its gradient for one chunk of labelled
  positions (``loss_args.chunk_size``; all labelled positions when 0), plus the chunk's logits in
  the run's dtype. This is where an unchunked 128k-vocabulary loss blows up.
* not counted: memory the allocator keeps after tensors are freed. On CPU without ``compile`` the
  process's peak RSS runs up to ~30% above this estimate, because glibc keeps eager mode's freed
  intermediates in its heap (``models/host_memory.py:keep_freed_host_memory`` asks it to, for speed;
  BENCHMARKS.md measures both).
* runtime: on CPU the process's own footprint (PyTorch, tokenizer, Python: ~0.35 GiB measured, ~0.6
  GiB with the compiler loaded), since the benchmark reports peak RSS; on CUDA the CUDA context is
  outside ``max_memory_allocated`` and counted as 0.

With ``compile`` the activation term follows what the compiler keeps (it recomputes norms and
SwiGLU's silu in backward instead of saving them), checked against measured peaks only. Batches are assumed full (``batch_size``
rows of ``max_seq_len`` tokens, all labelled in the worst case), which is what packing produces.

On W processes (FSDP2, the ``*_distributed`` recipes, ``world_size`` from ``--nproc-per-node`` ×
``--nnodes``) each rank holds:

* 1/W of every weight (NF4 shards too), adapter, gradient and optimizer state (rows split like
  ``torch.chunk``: ⌈rows / W⌉ per rank); with ``cpu_offload`` these live in host memory instead;
* gathered: the root unit (embedding, final norm, head) unsharded in the compute dtype from the
  forward to the end of the backward, two blocks unsharded at a time (the one running and the
  next, prefetched; all of them with ``reshard_after_forward=false``), an NF4 block's largest
  linear dequantized while it runs, and the unsharded gradients of one block (plus the root's,
  for full-weights training) in ``reduce_dtype`` before their reduce-scatter. Every micro-batch
  reduce-scatters, so no rank keeps full-size gradients between micro-batches;
* activations and logits for its ``batch_size / W`` rows.

Preference training (``estimate_preference``): two rows per pair (chosen and rejected; one row of
2 × ``max_seq_len`` tokens holding several pairs with ``data.packing``), one chunk of labelled
positions' logits at a time, and a reference whose cost depends on the mode: adapters switched off
(no weights; its no-grad pass runs after the policy's and reuses the room of its logits), a frozen
copy (its sharded weights, gathered root and blocks) or a precomputed table (8 bytes per pair).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunesmith.models.llama import matmul_attention_keys_per_query
from tunesmith.models.nf4 import BLOCK_SIZE, scaler_block_size

GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BYTES_PER_VALUE = 0.5 + 1 / 64  # 4-bit code + one int8 block scale (second-level factors negligible)
CPU_RUNTIME_BYTES = int(0.35 * GIB)
CPU_COMPILER_BYTES = int(0.25 * GIB)  # torch._inductor and its caches, once loaded


@dataclass
class MemoryEstimate:
    """Bytes by kind, per rank; ``str()`` prints a small table in GiB.

    Attributes:
        weights: Dense weights (this rank's shards on W processes).
        adapters: LoRA A and B and their gradients.
        optimizer: Optimizer state.
        activations: What autograd keeps for backward.
        logits: The loss's logits and their gradient.
        runtime: The process itself (CPU peak RSS).
        nf4: NF4 base weights (QLoRA; shards).
        gradients: Gradients of full-weights training (shards).
        gathered: FSDP's all-gathered weights and not-yet-reduced gradients in flight.
        reference: DPO's reference model (frozen copy, reference pass's logits, or table).
        world_size: Processes the run is split over (not bytes).
        offloaded: Host memory per rank with ``cpu_offload`` (not in the total: not GPU memory).
    """

    weights: float
    adapters: float
    optimizer: float
    activations: float
    logits: float
    runtime: float
    nf4: float = 0.0
    gradients: float = 0.0
    gathered: float = 0.0
    reference: float = 0.0
    world_size: int = 1
    offloaded: float = 0.0

    TERMS = ("weights", "nf4", "adapters", "gradients", "optimizer", "gathered", "reference", "activations", "logits",
             "runtime")
    ALWAYS = ("weights", "adapters", "optimizer", "activations", "logits", "runtime")

    @property
    def total(self) -> float:
        return sum(getattr(self, name) for name in self.TERMS)

    def __str__(self) -> str:
        where = f" per rank, {self.world_size} processes" if self.world_size > 1 else ""
        lines = [f"expected peak memory{where} (estimate):"]
        for name in self.TERMS:
            if name in self.ALWAYS or getattr(self, name) > 0:
                lines.append(f"  {name:<12} {getattr(self, name) / GIB:8.3f} GiB")
        lines.append(f"  {'total':<12} {self.total / GIB:8.3f} GiB")
        if self.offloaded:
            lines.append(f"  (+ {self.offloaded / GIB:.3f} GiB of shards and optimizer state in host memory: cpu_offload)")
        return "\n".join(lines)


def _linear_shapes(cfg: Any) -> dict[str, tuple[int, int]]:
    """(in, out) of each adaptable linear layer of one Llama-style block, and the output head.

    Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` are listed too: LoRA targets them by those names.
    """
    d, hd = cfg.hidden_size, cfg.head_dim
    q, kv, inter = cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.intermediate_size
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d), "output": (d, cfg.vocab_size),
            "qkv_proj": (d, q + 2 * kv), "gate_up_proj": (d, 2 * inter)}


# A fused layer holds exactly the weights of the ones it fuses: NF4 (QLoRA) when it is a target.
_FUSED_INTO = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
               "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def activation_bytes_per_token_layer(
    cfg: Any, dtype_bytes: int, rank: int, targets: list[str], compiled: bool = False,
    attention: str = "sdpa", seq_len: int = 0,
) -> float:
    """Bytes autograd saves per token in one block (no checkpointing).

    Counted in units of the run's dtype: 3·d (norm inputs/outputs that are not shared) + 3·I
    (SwiGLU) + 2·q + 2·kv (SDPA's q, k, v, output) + h (SDPA's log-sum-exp, fp32) + r per adapter
    (+ I when ``down_proj`` is adapted: its input is otherwise not kept);
    in 16-bit runs RMSNorm's fp32 upcast keeps one more fp32 copy of the residual stream (4·d bytes).
    ``attention="matmul"`` keeps q, k, v and every head's probabilities in the run's dtype
    (h·¾s per token from 128 positions on, where the causal split drops the masked quarter; h·s
    below) instead of SDPA's q, k, v, output and log-sum-exp.
    """
    d, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    block_targets = [t for t in targets if t != "output"]
    if compiled:
        # Inductor's partitioner recomputes cheap pointwise ops in backward instead of saving them:
        # RMSNorm keeps its input only (no fp32 copy, no output), SwiGLU keeps gate and up only.
        values = 2 * d + 2 * inter + 2 * q + 2 * kv + rank * len(block_targets)
        upcast = 0
    else:
        values = 3 * d + 3 * inter + 2 * q + 2 * kv + rank * len(block_targets)
        upcast = 4 * d if dtype_bytes < 4 else 0
    if "down_proj" in targets:  # its adapter keeps its input, silu(gate)·up, which nothing else saves
        values += inter
    if attention == "matmul":  # keeps q, k, v and the probabilities [h, ~¾s] per token; no output, no lse
        probs = cfg.num_heads * matmul_attention_keys_per_query(seq_len)
        return (values - q + probs) * dtype_bytes + upcast
    return values * dtype_bytes + 4 * cfg.num_heads + upcast


def estimate(
    cfg: Any,
    *,
    dtype: str,
    batch_size: int,
    seq_len: int,
    rank: int,
    targets: list[str],
    quantize_base: bool = False,
    optimizer: str = "adamw",
    activation_checkpointing: bool = False,
    chunk_size: int = 1024,
    device_type: str = "cpu",
    compile: bool = False,
    attention: str = "sdpa",
    full: bool = False,
    world_size: int = 1,
    compute_dtype: str | None = None,
    reduce_dtype: str | None = None,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
) -> MemoryEstimate:
    """Peak memory per rank of LoRA / QLoRA / full-weights training for a model shape and run settings.

    Args:
        cfg: A ``LlamaConfig`` (or any config with its field names: ``GemmaConfig``).
        dtype: ``fp32``, ``bf16`` or ``fp16``: stored weights, adapters, gradients, optimizer state.
        batch_size: Rows per GLOBAL micro-batch (each of W ranks takes batch_size / W).
        seq_len: Tokens per row (``data.max_seq_len``).
        rank: LoRA rank (unused when ``full``).
        targets: LoRA target leaf names (unused when ``full``).
        quantize_base: NF4 base weights for the targeted layers (QLoRA).
        optimizer: ``adamw``, ``adamw8bit`` or ``paged_adamw8bit``.
        activation_checkpointing: Keep only block inputs.
        chunk_size: The cross-entropy's chunk of labelled positions (0: all at once).
        device_type: ``cpu`` (peak RSS, includes the runtime) or ``cuda`` (peak allocated).
        compile: Blocks are compiled: fewer saved activations (see ``activation_bytes_per_token_layer``)
            and, on CPU, the compiler's own footprint.
        attention: ``sdpa`` or ``matmul`` (the latter keeps [s × s] probabilities per head).
        full: Every weight trains (full fine-tune): gradients and optimizer state for all of them.
        world_size: Processes (FSDP2 shards over them when > 1).
        compute_dtype: FSDP mixed precision: gathered weights and activations in this dtype.
        reduce_dtype: Dtype of the unsharded gradients before their reduce-scatter.
        cpu_offload: Shards and optimizer state in host memory (``offloaded``).
        reshard_after_forward: ``False`` keeps every block gathered from its forward to its backward.
    """
    e = DTYPE_BYTES[dtype]
    c = DTYPE_BYTES[compute_dtype or dtype]  # activations and gathered weights
    r_bytes = DTYPE_BYTES[reduce_dtype or compute_dtype or dtype]
    w = world_size
    sharded = w > 1
    shapes = _linear_shapes(cfg)
    tied = getattr(cfg, "tie_embeddings", False)
    targets = [] if full else list(targets)
    block_linears = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    nf4_names = [n for n in targets if quantize_base and (n != "output" or not tied)]

    def in_nf4(name: str) -> bool:
        """The block linear ``name`` is stored in NF4: targeted itself, or fused into a target (Phi-3)."""
        return name in nf4_names or _FUSED_INTO.get(name) in nf4_names

    def per_rank(rows: int, cols: int, nbytes_per_value: float) -> float:
        """Bytes of this rank's ⌈rows / W⌉ rows."""
        return -(-rows // w) * cols * nbytes_per_value

    def nf4_bytes(rows: int, cols: int) -> float:
        """Codes, block scales, group factors (+ mean and the 16 levels) of this rank's rows."""
        local = -(-rows // w)
        blocks = local * cols // BLOCK_SIZE
        return local * cols / 2 + blocks + blocks // scaler_block_size((rows, cols)) * e + 17 * e

    # Weights: embedding (+ untied head) + per block 7 linears and 2 norms + final norm.
    d, v, layers = cfg.hidden_size, cfg.vocab_size, cfg.num_layers
    weights = per_rank(v, d, e) + (2 * layers + 1) * per_rank(d, 1, e)
    nf4 = 0.0
    for name in block_linears:
        fan_in, fan_out = shapes[name]
        if in_nf4(name):
            nf4 += layers * nf4_bytes(fan_out, fan_in)
        else:
            weights += layers * per_rank(fan_out, fan_in, e)
    if not tied and "output" in nf4_names:
        nf4 += nf4_bytes(v, d)
    elif not tied:
        weights += per_rank(v, d, e)

    # Trainable values: LoRA's A [r, in] and B [out, r] per adapted layer, or every weight.
    per_tensor: list[float] = []  # this rank's values of each trainable tensor
    if full:
        per_tensor += [per_rank(v, d, 1)] + ([] if tied else [per_rank(v, d, 1)]) + [per_rank(d, 1, 1)] * (2 * layers + 1)
        for name in block_linears:
            fan_in, fan_out = shapes[name]
            per_tensor += [per_rank(fan_out, fan_in, 1)] * layers
    for name in targets:
        fan_in, fan_out = shapes[name]
        count = 1 if name == "output" else layers
        per_tensor += [per_rank(rank, fan_in, 1), per_rank(fan_out, rank, 1)] * count
    trainable = sum(per_tensor)
    adapters = 0.0 if full else 2.0 * trainable * e
    gradients = trainable * e if full else 0.0
    if optimizer in ("adamw8bit", "paged_adamw8bit"):
        opt = sum(2 * n * (1 if n >= 4096 else 4) for n in per_tensor)
    else:
        opt = 2 * trainable * e

    # FSDP: what is gathered (unsharded) while a micro-batch runs.
    gathered = 0.0
    if sharded:
        block_dense = sum(fan_in * fan_out for name, (fan_in, fan_out) in shapes.items()
                          if name in block_linears and not in_nf4(name)) * c + 2 * d * c
        block_nf4 = sum(nf4_bytes(fan_out, fan_in) * w for name, (fan_in, fan_out) in shapes.items()
                        if name in block_linears and in_nf4(name))
        biggest_dequantized = max((fan_in * fan_out * c for name, (fan_in, fan_out) in shapes.items()
                                   if name in nf4_names), default=0)
        blocks_alive = 2 if reshard_after_forward else layers
        root_bytes = v * d * c * (1 if tied else 2) + d * c
        gathered = root_bytes + min(blocks_alive, layers) * (block_dense + block_nf4) + biggest_dequantized
        block_trainable = (sum(fan_in * fan_out for name, (fan_in, fan_out) in shapes.items() if name in block_linears)
                           + 2 * d) if full else sum(rank * (fan_in + fan_out) for name, (fan_in, fan_out) in shapes.items()
                                                      if name in targets and name != "output")
        gathered += block_trainable * r_bytes  # one block's unsharded gradients before the reduce-scatter
        if full:
            gathered += (v * d * (1 if tied else 2) + d) * r_bytes  # the root's, reduced at the end of backward
    offloaded = 0.0
    if cpu_offload and sharded:
        offloaded = weights + nf4 + opt + gradients + (adapters / 2 if not full else 0.0)
        weights, nf4, opt, gradients = 0.0, 0.0, 0.0, 0.0
        adapters /= 2  # values offloaded; gradients are computed on the GPU

    # Activations saved for backward, and the loss's logits for one chunk, for this rank's rows.
    tokens = -(-batch_size // w) * seq_len
    act_targets = ["down_proj"] if full else targets  # full training keeps every linear's input (down's: + I)
    per_layer = activation_bytes_per_token_layer(cfg, c, 0 if full else rank, act_targets, compiled=compile,
                                                 attention=attention, seq_len=seq_len)
    if activation_checkpointing:
        activations = tokens * (layers * d * c + per_layer)
    else:
        activations = tokens * layers * per_layer
        if attention == "matmul" and "k_proj" not in targets and not full:  # layer 0's keys need no gradient
            activations -= tokens * cfg.num_heads * cfg.head_dim * c
    activations += tokens * (2 * cfg.head_dim * c + c * d)  # RoPE tables, labelled hidden states
    positions = tokens if chunk_size <= 0 else min(chunk_size, tokens)
    logits = positions * v * (c + 2 * 4)

    runtime = 0.0
    if device_type == "cpu":
        runtime = CPU_RUNTIME_BYTES + (CPU_COMPILER_BYTES if compile else 0)
    return MemoryEstimate(float(weights), float(adapters), float(opt), float(activations), float(logits),
                          float(runtime), nf4=float(nf4), gradients=float(gradients), gathered=float(gathered),
                          world_size=w, offloaded=float(offloaded))


def model_config(source: str) -> Any:
    """The model's shape from a builder name, an HF folder / Hub id (``config.json`` only) or a GGUF file."""
    from pathlib import Path

    from tunesmith.models import builders
    from tunesmith.training.setup import resolve_source

    if source in builders.BUILDERS:
        return builders.BUILDERS[source]()
    path = resolve_source(source)
    if path.endswith(".gguf"):
        import gguf

        from tunesmith.models.gguf_loader import config_from_reader

        return config_from_reader(gguf.GGUFReader(path), path)[2]
    from tunesmith.models.hf_checkpoint import read_config

    model_dir = Path(path)
    if not model_dir.is_dir():
        # A Hub id: a known size needs no network (an -Instruct repo has its base's shape) …
        by_repo = {repo: name for name, repo in builders.HUB_IDS.items()}
        name = by_repo.get(path) or by_repo.get(path.replace("-Instruct", ""))  # Mistral: -Instruct-v0.3
        if name:
            return builders.BUILDERS[name]()
        from huggingface_hub import hf_hub_download  # … otherwise fetch config.json alone

        model_dir = Path(hf_hub_download(path, "config.json")).parent
    d, family, _ = read_config(model_dir)
    return family.config_from_hf(d)


def _run_dtype(cfg: Any) -> tuple[str, str]:
    """(dtype name, device type) a run resolves ``dtype=auto`` / ``device=auto`` to.

    ``device=cuda`` is taken at its word (a dry run plans a GPU run on any machine); ``auto`` means
    this machine's device. ``dtype=auto`` is bf16 on CUDA, fp32 on CPU, as the recipes choose.
    """
    import torch

    from tunesmith.training.setup import select_device

    device = select_device("auto") if cfg.device == "auto" else torch.device(cfg.device)
    return (cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")), device.type


def _run_settings(cfg: Any, world_size: int) -> dict[str, Any]:
    """``estimate`` keyword arguments every recipe config provides (``RunOptions`` + ``ShardingOptions``)."""
    dtype, device_type = _run_dtype(cfg)
    chunk = int(cfg.loss_args.get("chunk_size", 1024)) if cfg.loss == "cross_entropy" else 0
    lora = getattr(cfg, "lora", None)
    return dict(
        dtype=dtype, rank=lora.rank if lora else 0, targets=list(lora.targets) if lora else [],
        quantize_base=getattr(cfg, "quantize_base", False), optimizer=cfg.optimizer,
        activation_checkpointing=cfg.activation_checkpointing, chunk_size=chunk, device_type=device_type,
        compile=getattr(cfg, "compile", False), attention=cfg.attention, world_size=world_size,
        compute_dtype=getattr(cfg, "compute_dtype", None), reduce_dtype=getattr(cfg, "reduce_dtype", None),
        cpu_offload=getattr(cfg, "cpu_offload", False),
        reshard_after_forward=getattr(cfg, "reshard_after_forward", True),
    )


def estimate_run_memory(cfg: Any, world_size: int = 1) -> MemoryEstimate:
    """``estimate`` for an SFT recipe ``Config``: (Q)LoRA, or every weight when it has no ``lora`` (full fine-tune).

    Args:
        cfg: The recipe's resolved config.
        world_size: Processes of the launch (``--nproc-per-node`` × ``--nnodes``).
    """
    settings = _run_settings(cfg, world_size)
    return estimate(model_config(cfg.model), batch_size=cfg.batch_size, seq_len=cfg.data.max_seq_len,
                    full=not hasattr(cfg, "lora"), **settings)


def estimate_preference_memory(cfg: Any, world_size: int = 1) -> MemoryEstimate:
    """``estimate`` for a preference recipe ``Config`` (DPO and friends), reference included.

    Two rows of ``max_seq_len`` per pair (one row of 2 × ``max_seq_len`` per ``batch_size`` with
    packing); the log-probs project ``LOGPROB_CHUNK_SIZE`` labelled positions at a time
    (``training/preference.py``), so the logits term is one chunk's, plus, for a frozen LoRA head,
    the [n, d] gradient of the labelled hidden states that the chunked pass keeps for backward.
    The reference adds: nothing with LoRA (adapters off: a no-grad pass after the policy's, whose
    one chunk of logits replaces the policy's freed one); a frozen copy's weights (sharded like the
    policy's, gathered root and blocks while it runs) with ``full``; nothing counted with
    ``precompute_reference`` (the table is 8 bytes per pair: 8 MB for a million pairs) or for
    reference-free losses (SimPO, ORPO).
    """
    from tunesmith.training.preference import LOGPROB_CHUNK_SIZE
    from tunesmith.training.preference_losses import build_preference_loss

    settings = _run_settings(cfg, world_size) | {"chunk_size": LOGPROB_CHUNK_SIZE}
    shape = model_config(cfg.model)
    rows, seq = (cfg.batch_size, 2 * cfg.data.max_seq_len) if cfg.data.packing else (2 * cfg.batch_size, cfg.data.max_seq_len)
    est = estimate(shape, batch_size=rows, seq_len=seq, full=cfg.full, **settings)
    if not cfg.full:  # the frozen head's per-position gradient [n, d], kept from forward to backward
        est.logits += -(-rows // world_size) * seq * shape.hidden_size * DTYPE_BYTES[settings["compute_dtype"] or settings["dtype"]]
    if cfg.precompute_reference or not getattr(build_preference_loss(cfg.loss, cfg.loss_args), "needs_reference", True):
        return est
    if cfg.full:  # a frozen copy: the policy's weights again, and its own gathered units while it runs
        copy = estimate(shape, batch_size=rows, seq_len=seq, full=False, **(settings | {"targets": [], "rank": 0}))
        est.reference += copy.weights + copy.nf4 + copy.gathered
        est.offloaded += copy.offloaded
    return est


# ------------------------------------------------------------------------------------------------
# GRPO and knowledge distillation (recipes grpo_single_device, knowledge_distillation_single_device)
# ------------------------------------------------------------------------------------------------
def kv_cache_bytes(cfg: Any, dtype_bytes: int, rows: int, length: int) -> float:
    """Keys and values of ``rows`` sequences of ``length`` positions in every layer (generation's cache)."""
    return float(2 * rows * length * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes)


def estimate_grpo_memory(cfg: Any) -> MemoryEstimate:
    """Peak memory of a GRPO run (``grpo_single_device`` Config): the LoRA terms for its update batch.

    The update processes ``batch_size × num_generations`` rows of ``max_prompt_len + max_new_tokens``
    tokens; sampling, which never overlaps the update, holds a KV cache for ``num_generations`` rows
    instead of the activations, so the activation term is the larger of the two. The reference and
    sampling-policy passes run without grad and keep nothing.
    """
    dtype, device_type = _run_dtype(cfg)
    shape = model_config(cfg.model)
    seq_len = cfg.data.max_prompt_len + cfg.max_new_tokens
    est = estimate(
        shape, dtype=dtype, batch_size=cfg.batch_size * cfg.num_generations, seq_len=seq_len, rank=cfg.lora.rank,
        targets=list(cfg.lora.targets), quantize_base=cfg.quantize_base, optimizer=cfg.optimizer,
        activation_checkpointing=cfg.activation_checkpointing, chunk_size=cfg.logprob_chunk_size,
        device_type=device_type, attention=cfg.attention,
    )
    est.activations = max(est.activations, kv_cache_bytes(shape, DTYPE_BYTES[dtype], cfg.num_generations, seq_len))
    return est


def estimate_distillation_memory(cfg: Any) -> MemoryEstimate:
    """Peak memory of a distillation run (``knowledge_distillation_single_device`` Config).

    The student's terms are the LoRA estimate's (with ``full=true``: every weight trained, so
    gradients and AdamW moments for all of them, activations as for adapters on every linear
    layer — an approximation). The teacher adds its weights (NF4 where ``teacher_quantize``), its
    final hidden states for the batch, and, per loss chunk, its logits and log-probabilities next to
    the student's (fp32) — which is why the losses go chunk by chunk.
    """
    dtype, device_type = _run_dtype(cfg)
    e = DTYPE_BYTES[dtype]
    from tunesmith.training.distillation import check_teacher_exists

    student, teacher = model_config(cfg.model), model_config(check_teacher_exists(cfg.teacher))
    tokens = cfg.batch_size * cfg.data.max_seq_len
    chunk = int(cfg.loss_args.get("chunk_size", 1024))
    all_linears = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    est = estimate(
        student, dtype=dtype, batch_size=cfg.batch_size, seq_len=cfg.data.max_seq_len, rank=cfg.lora.rank,
        targets=all_linears if cfg.full else list(cfg.lora.targets), quantize_base=cfg.quantize_base and not cfg.full,
        optimizer=cfg.optimizer, activation_checkpointing=cfg.activation_checkpointing, chunk_size=chunk,
        device_type=device_type, attention=cfg.attention,
    )
    if cfg.full:  # every weight has a gradient and two AdamW moments; no adapters
        weights = est.weights
        est.adapters = weights
        est.optimizer = 2 * weights if cfg.optimizer == "adamw" else 2 * weights / e
    # Only the weights term of this estimate is used: the teacher's, NF4 on every block linear when quantized.
    teacher_est = estimate(teacher, dtype=dtype, batch_size=1, seq_len=1, rank=1, targets=all_linears,
                           quantize_base=cfg.teacher_quantize)
    positions = tokens if chunk <= 0 else min(chunk, tokens)
    est.weights += teacher_est.weights
    est.activations += tokens * teacher.hidden_size * e
    est.logits += positions * teacher.vocab_size * (e + 3 * 4)  # teacher chunk logits + fp32 log-probs and probs
    return est
