"""Matrix-multiply FLOPs of a training step, counted from the shapes, and the GEMM rate to divide them by.

The *floor share* of a step is how close it runs to what the machine's matrix multiplies allow:

    floor share = (step GEMM FLOPs / measured GEMM rate) / step time
                = tokens/s × (step GEMM FLOPs / step tokens) / GEMM rate

so 100% means the step did nothing but matmuls at the rate a plain ``torch.matmul`` reaches on the
model's own GEMM shapes, in the same process and dtype (``gemm_rate``).

Counted per step (one GEMM of [m, k] @ [k, n] is 2·m·k·n FLOPs; T = rows × seq tokens, n_lab =
labelled positions, each linear layer (in → out), h query heads of width hd, r the LoRA rank):

* forward: every block linear 2·T·in·out; each adapter 2·T·r·(in + out); attention's two
  batched matmuls 2 · 2·T·h·hd·K, with K keys per query (causal: (s + 1)/2 by default, or what an
  implementation computes, ``keys_per_query``); the head 2·n_lab·d·v.
* input gradients: 2·T·in·out for each linear whose input needs a gradient (so layer 0's q/k/v
  in a LoRA run, whose input is the frozen embedding, has none); per adapter 2·T·r·out for B's
  input, and 2·T·in·r for A's when its input needs a gradient; attention: dP = dO Vᵀ and dQ = dS K
  when the queries (or keys) need one, dV = Pᵀ dO when the values do, dK = dSᵀ Q when the keys
  do, 2·T·h·hd·K each; the head's 2·n_lab·d·v.
* weight gradients, only where weights train: 2·T·r·(in + out) per adapter; with ``full`` every
  linear's 2·T·in·out and the head's 2·n_lab·d·v.
* activation checkpointing: every block's forward once more (the recompute); ``head_recompute``:
  the head's forward once more (a loss that checkpoints its chunks of a trained head).
* ``reference_forward`` (DPO with adapters switched off): one more forward of the frozen base
  (no adapters, no gradient).

Not counted: element-wise work (norms, RoPE, softmax, SwiGLU, the loss's softmax), the
embedding's gather/scatter, the optimizer. Those are what a step spends above its floor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class StepFlops:
    """GEMM FLOPs of one optimizer step, by kind.

    Attributes:
        forward: Forward GEMMs (policy; plus a no-grad reference pass with ``reference_forward``).
        input_grad: Gradient-for-the-input GEMMs.
        weight_grad: Gradient-for-the-weight GEMMs (adapters, or every weight with ``full``).
        recompute: Forward GEMMs recomputed by activation checkpointing.
        tokens: Tokens in the step (rows × seq).
    """

    forward: float = 0.0
    input_grad: float = 0.0
    weight_grad: float = 0.0
    recompute: float = 0.0
    tokens: int = 0
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.forward + self.input_grad + self.weight_grad + self.recompute

    @property
    def per_token(self) -> float:
        return self.total / max(1, self.tokens)


def _shapes(cfg: Any) -> dict[str, tuple[int, int]]:
    """(in, out) of each block linear."""
    d, hd = cfg.hidden_size, cfg.head_dim or cfg.hidden_size // cfg.num_heads
    q, kv, inter = cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.intermediate_size
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}


def train_step_flops(
    cfg: Any,
    *,
    rows: int,
    seq_len: int,
    targets: list[str] | tuple[str, ...] = (),
    rank: int = 0,
    full: bool = False,
    labelled: int | None = None,
    activation_checkpointing: bool = False,
    keys_per_query: float | None = None,
    reference_forward: bool = False,
    head_recompute: bool = False,
) -> StepFlops:
    """GEMM FLOPs of one forward + backward over ``rows × seq_len`` tokens (see the module docstring).

    Args:
        cfg: A ``LlamaConfig`` (or a config with its field names).
        rows: Rows in the step (all micro-batches together; DPO: 2 per pair).
        seq_len: Tokens per row.
        targets: LoRA's block targets (ignored with ``full``); an empty list with ``full=False``
            counts a frozen model (forward and input gradients only).
        rank: LoRA rank.
        full: Every weight trains (full fine-tune).
        labelled: Positions projected to the vocabulary (default: every token).
        activation_checkpointing: Blocks are recomputed in backward.
        keys_per_query: Keys each query's scores cover (default causal, (s + 1) / 2;
            ``matmul_attention_keys_per_query(s)`` for tunesmith's ``attention: matmul``).
        reference_forward: Add a no-grad forward of the frozen base (DPO's adapters-off reference).
        head_recompute: The loss checkpoints its head projection (a trained head, chunked: its
            chunks are projected again in backward).
    """
    T = rows * seq_len
    n_lab = T if labelled is None else labelled
    d, v = cfg.hidden_size, cfg.vocab_size
    hd = cfg.head_dim or d // cfg.num_heads
    K = (seq_len + 1) / 2 if keys_per_query is None else keys_per_query
    attn = 2.0 * T * cfg.num_heads * hd * K  # one of attention's batched matmuls
    shapes = _shapes(cfg)
    tgt = set() if full else {t for t in targets if t in shapes}
    f = StepFlops(tokens=T)

    def add(kind: str, part: str, flops: float) -> None:
        setattr(f, kind, getattr(f, kind) + flops)
        f.parts[part] = f.parts.get(part, 0.0) + flops

    block_forward = 0.0
    x_grad = full  # does the block's input need a gradient? (layer 0: only if the embedding trains)
    for _ in range(cfg.num_layers):
        def linear(name: str, in_grad: bool) -> bool:
            """Count one (LoRA-)linear layer; → whether its output needs a gradient."""
            nonlocal block_forward
            i, o = shapes[name]
            fwd = 2.0 * T * i * o + (2.0 * T * rank * (i + o) if name in tgt else 0.0)
            block_forward += fwd
            add("forward", "linear", 2.0 * T * i * o)
            if in_grad:
                add("input_grad", "linear", 2.0 * T * i * o)
            if full:
                add("weight_grad", "linear", 2.0 * T * i * o)
            if name in tgt:
                add("forward", "lora", 2.0 * T * rank * (i + o))
                add("input_grad", "lora", 2.0 * T * rank * o + (2.0 * T * i * rank if in_grad else 0.0))
                add("weight_grad", "lora", 2.0 * T * rank * (i + o))
            return in_grad or full or name in tgt

        q, k, vv = (linear(n, x_grad) for n in ("q_proj", "k_proj", "v_proj"))
        block_forward += 2 * attn
        add("forward", "attention", 2 * attn)
        attn_out = q or k or vv
        if attn_out:
            add("input_grad", "attention", attn * ((q or k) + q + vv + k))  # dP, dQ, dV, dK
        h1 = linear("o_proj", attn_out) or x_grad  # the residual stream after attention
        gate, up = linear("gate_proj", h1), linear("up_proj", h1)
        x_grad = linear("down_proj", gate or up) or h1  # the next block's input
    add("forward", "head", 2.0 * n_lab * d * v)
    if x_grad:
        add("input_grad", "head", 2.0 * n_lab * d * v)
    if full:
        add("weight_grad", "head", 2.0 * n_lab * d * v)
    if activation_checkpointing:
        add("recompute", "recompute", block_forward)
    if head_recompute:
        add("recompute", "head", 2.0 * n_lab * d * v)
    if reference_forward:
        base = sum(2.0 * T * i * o for i, o in shapes.values()) + 2 * attn
        add("forward", "reference", cfg.num_layers * base + 2.0 * n_lab * d * v)
    return f


def gemm_rate(cfg: Any, dtype: torch.dtype, tokens: int, head_chunk: int = 256, device: str = "cpu",
              seconds: float = 1.0) -> float:
    """FLOP/s of ``torch.matmul`` on the model's GEMM shapes, in ``dtype``, measured now (this process).

    Times [tokens, in] @ [in, out] for each block linear and [head_chunk, d] @ [d, v] for the head,
    each the best of a few bursts (a shared machine's hiccup is not its rate), and returns their
    total FLOPs over their total time, so each shape weighs as much as its FLOPs do.

    Args:
        tokens: Rows of the linear GEMMs (the step's tokens per micro-batch).
        head_chunk: Rows of the head GEMM (the loss's chunk of labelled positions).
        seconds: Rough time budget for the whole measurement.
    """
    shapes = list(_shapes(cfg).values()) + [(cfg.hidden_size, cfg.vocab_size)]
    rows = [tokens] * (len(shapes) - 1) + [min(head_chunk, tokens) if head_chunk > 0 else tokens]
    gen = torch.Generator().manual_seed(0)
    total_flops, total_time = 0.0, 0.0
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for (i, o), m in zip(shapes, rows):
        a = torch.randn(m, i, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(i, o, generator=gen).to(device=device, dtype=dtype)
        a @ b  # warm-up: first-call packing, allocator
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        once = max(time.perf_counter() - start, 1e-6)
        reps = max(1, int(seconds / len(shapes) / 3 / once))
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(reps):
                a @ b
            sync()
            best = min(best, (time.perf_counter() - start) / reps)
        total_flops += 2.0 * m * i * o
        total_time += best
    return total_flops / total_time
