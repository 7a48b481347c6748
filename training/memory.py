"""Expected peak memory of a (Q)LoRA run, before renting the GPU: ``tune-run RECIPE --config X --dry-run``.

    peak ≈ runtime + weights + adapters (+ grads) + optimizer state + activations + logits

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
* runtime: on CPU the process's own footprint (PyTorch, tokenizer, Python: ~0.35 GiB measured, ~0.6
  GiB with the compiler loaded), since the benchmark reports peak RSS; on CUDA the CUDA context is
  outside ``max_memory_allocated`` and counted as 0.

With ``compile`` the activation term follows what the compiler keeps (it recomputes norms and
SwiGLU's silu in backward instead of saving them), checked against measured peaks only. Batches are assumed full (``batch_size``
rows of ``max_seq_len`` tokens, all labelled in the worst case), which is what packing produces.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from tunesmith.models.llama import matmul_attention_keys_per_query

GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BYTES_PER_VALUE = 0.5 + 1 / 64  # 4-bit code + one int8 block scale (second-level factors negligible)
CPU_RUNTIME_BYTES = int(0.35 * GIB)
CPU_COMPILER_BYTES = int(0.25 * GIB)  # torch._inductor and its caches, once loaded


@dataclass
class MemoryEstimate:
    """Bytes by kind; ``str()`` prints a small table in GiB."""

    weights: float
    adapters: float
    optimizer: float
    activations: float
    logits: float
    runtime: float

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    def __str__(self) -> str:
        lines = ["expected peak memory (estimate):"]
        for f in fields(self):
            lines.append(f"  {f.name:<12} {getattr(self, f.name) / GIB:8.3f} GiB")
        lines.append(f"  {'total':<12} {self.total / GIB:8.3f} GiB")
        return "\n".join(lines)


def _linear_shapes(cfg: Any) -> dict[str, tuple[int, int]]:
    """(in, out) of each adaptable linear layer of one Llama-style block, and the output head."""
    d, hd = cfg.hidden_size, cfg.head_dim
    q, kv, inter = cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.intermediate_size
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d), "output": (d, cfg.vocab_size)}


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
) -> MemoryEstimate:
    """Peak memory of LoRA / QLoRA training for a model shape and run settings.

    Args:
        cfg: A ``LlamaConfig`` (or any config with its field names).
        dtype: ``fp32``, ``bf16`` or ``fp16``: weights, adapters, activations.
        batch_size: Rows per micro-batch.
        seq_len: Tokens per row (``data.max_seq_len``).
        rank: LoRA rank.
        targets: LoRA target leaf names.
        quantize_base: NF4 base weights for the targeted layers (QLoRA).
        optimizer: ``adamw``, ``adamw8bit`` or ``paged_adamw8bit``.
        activation_checkpointing: Keep only block inputs.
        chunk_size: The cross-entropy's chunk of labelled positions (0: all at once).
        device_type: ``cpu`` (peak RSS, includes the runtime) or ``cuda`` (peak allocated).
        compile: Blocks are compiled: fewer saved activations (see ``activation_bytes_per_token_layer``)
            and, on CPU, the compiler's own footprint.
        attention: ``sdpa`` or ``matmul`` (the latter keeps [s × s] probabilities per head).
    """
    e = DTYPE_BYTES[dtype]
    shapes = _linear_shapes(cfg)
    tokens = batch_size * seq_len
    tied = getattr(cfg, "tie_embeddings", False)

    # Weights: embedding (+ untied head) + per block 7 linears and 2 norms + final norm.
    block_linears = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    embed = cfg.vocab_size * cfg.hidden_size
    weights = float(embed * e + (2 * cfg.num_layers + 1) * cfg.hidden_size * e)
    for name in block_linears:
        n = shapes[name][0] * shapes[name][1] * cfg.num_layers
        weights += n * (NF4_BYTES_PER_VALUE if quantize_base and name in targets else e)
    if not tied:
        weights += embed * (NF4_BYTES_PER_VALUE if quantize_base and "output" in targets else e)

    # Adapters (values and gradients) and optimizer state.
    per_tensor: list[int] = []
    for name in targets:
        fan_in, fan_out = shapes[name]
        count = 1 if name == "output" else cfg.num_layers
        per_tensor += [rank * fan_in, rank * fan_out] * count
    trainable = sum(per_tensor)
    adapters = 2.0 * trainable * e
    if optimizer in ("adamw8bit", "paged_adamw8bit"):
        opt = sum(2 * n * (1 if n >= 4096 else 4) for n in per_tensor)
    else:
        opt = 2 * trainable * e

    # Activations saved for backward, and the loss's logits for one chunk.
    per_layer = activation_bytes_per_token_layer(cfg, e, rank, targets, compiled=compile, attention=attention,
                                                 seq_len=seq_len)
    if activation_checkpointing:
        activations = tokens * (cfg.num_layers * cfg.hidden_size * e + per_layer)
    else:
        activations = tokens * cfg.num_layers * per_layer
        if attention == "matmul" and "k_proj" not in targets:  # layer 0's keys need no gradient: q not kept
            activations -= tokens * cfg.num_heads * cfg.head_dim * e
    activations += tokens * (2 * cfg.head_dim * e + e * cfg.hidden_size)  # RoPE tables, labelled hidden states
    positions = tokens if chunk_size <= 0 else min(chunk_size, tokens)
    logits = positions * cfg.vocab_size * (e + 2 * 4)

    runtime = 0.0
    if device_type == "cpu":
        runtime = CPU_RUNTIME_BYTES + (CPU_COMPILER_BYTES if compile else 0)
    return MemoryEstimate(weights, adapters, float(opt), float(activations), float(logits), float(runtime))


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
        name = by_repo.get(path) or by_repo.get(path.removesuffix("-Instruct"))
        if name:
            return builders.BUILDERS[name]()
        from huggingface_hub import hf_hub_download  # … otherwise fetch config.json alone

        model_dir = Path(hf_hub_download(path, "config.json")).parent
    d, family, _ = read_config(model_dir)
    return family.config_from_hf(d)


def estimate_run_memory(cfg: Any) -> MemoryEstimate:
    """``estimate`` for a (Q)LoRA recipe ``Config`` (model, dtype, batch, data, lora, toolbox switches)."""
    from tunesmith.training.setup import select_device

    device = select_device(cfg.device)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return estimate(
        model_config(cfg.model), dtype=dtype, batch_size=cfg.batch_size, seq_len=cfg.data.max_seq_len,
        rank=cfg.lora.rank, targets=list(cfg.lora.targets), quantize_base=getattr(cfg, "quantize_base", False),
        optimizer=cfg.optimizer, activation_checkpointing=cfg.activation_checkpointing,
        chunk_size=int(cfg.loss_args.get("chunk_size", 1024)) if cfg.loss == "cross_entropy" else 0,
        device_type=device.type, compile=cfg.compile, attention=cfg.attention,
    )


# ------------------------------------------------------------------------------------------------
# GRPO and knowledge distillation (recipes grpo_single_device, knowledge_distillation_single_device)
# ------------------------------------------------------------------------------------------------
def kv_cache_bytes(cfg: Any, dtype_bytes: int, rows: int, length: int) -> float:
    """Keys and values of ``rows`` sequences of ``length`` positions in every layer (generation's cache)."""
    return float(2 * rows * length * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes)


def _run_dtype(cfg: Any) -> tuple[str, str]:
    """(dtype name, device type) the run resolves ``dtype=auto`` / ``device=auto`` to."""
    from tunesmith.training.setup import select_device

    device = select_device(cfg.device)
    return (cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")), device.type


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
