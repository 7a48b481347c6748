"""The Llama decoder (Llama 2, 3, 3.1, 3.2 and SmolLM2), readable in one sitting.

    tokens ─► tok_embeddings ─► [ Block ] × num_layers ─► norm ─► output ─► logits
                                   │
                 x = x + attn(attn_norm(x))      attention: GQA + RoPE through SDPA
                 x = x + mlp(mlp_norm(x))        mlp: SwiGLU  down(silu(gate(x)) * up(x))

Projection names (``q_proj`` … ``down_proj``) are the Hugging Face leaf names on purpose: a LoRA
target list reads the same here, in PEFT's ``adapter_config.json`` and in a user's head. The map
from HF's full parameter names to ours lives in ``models/llama_hf.py``.

Shapes in comments: b = batch, s = sequence, d = hidden size, h = heads, kvh = key/value heads,
hd = head dim, v = vocabulary.

The smaller pieces (``RMSNorm``, ``rope_inv_freq``, ``apply_rope``, ``KVCache``, ``attention_mask``,
``matmul_attention``) are public so the other families (Gemma) reuse them and show only what they
change. The families that are a small delta on Llama (Qwen, Mistral, Phi-3) subclass the classes
below and override one step each: ``Attention.project`` (how q, k, v are computed), ``Llama.make_block``
(which attention and MLP a layer gets), ``Llama.rope`` (the cos/sin tables); a layer's
``attn.sliding_window`` makes it attend locally.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass
class LlamaConfig:
    """Shape of a Llama-architecture model. Field names follow HF ``config.json`` where they can.

    Attributes:
        vocab_size: Number of token ids.
        hidden_size: Width of the residual stream (d).
        num_layers: Number of transformer blocks.
        num_heads: Query heads (h).
        num_kv_heads: Key/value heads (kvh); ``num_heads % num_kv_heads == 0`` (GQA; MQA when 1).
        intermediate_size: Width of the MLP's hidden layer.
        head_dim: Per-head width; defaults to ``hidden_size // num_heads``.
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base.
        rope_scaling: HF's ``rope_scaling`` dict, e.g. Llama 3.1's ``{"rope_type": "llama3",
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}``; ``None`` for plain RoPE.
        max_seq_len: Longest sequence the model was trained for (sizes KV caches by default).
        tie_embeddings: Output head shares the token-embedding matrix (Llama 3.2, SmolLM2).
        bos_token_id: Beginning-of-sequence id, when known; carried only so a saved
            ``config.json`` keeps it (the tokenizer is what uses it).
        eos_token_id: End-of-sequence id (or ids), when known; as above.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    family: str = field(default="llama")

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back (as HF does, so bf16 runs match)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> Tensor:
    """Inverse RoPE frequencies, [hd/2], with optional Llama 3.1 ("llama3") or "linear" scaling.

    Llama 3.1 keeps high frequencies (short wavelengths) as they are, divides low frequencies by
    ``factor`` and interpolates smoothly between the two bands, so long-context positions stay
    distinguishable without disturbing the short-range behaviour learned in pre-training.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: llama3, linear)")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(
    inv_freq: Tensor, positions: Tensor, dtype: torch.dtype, scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """cos and sin tables for ``positions`` [b, s] → each [b, 1, s, 2·len(inv_freq)], computed in fp32.

    ``scale`` multiplies both before the cast (LongRoPE's attention factor, Phi-3).
    """
    freqs = positions[..., None].float() * inv_freq.float()  # [b, s, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # HF's "rotate half" layout, not interleaved pairs
    return (emb.cos() * scale).to(dtype)[:, None], (emb.sin() * scale).to(dtype)[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` [b, h, s, hd] by position: the first and second halves form the pairs.

    Tables narrower than the head (partial rotary, Phi-3/4) rotate only its first ``cos.shape[-1]``
    dimensions; the rest pass through unchanged.
    """
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# HF's ``layer_types`` values: a layer attends within a sliding window, or to every earlier position.
SLIDING = "sliding_attention"
GLOBAL = "full_attention"


def check_layer_types(layer_types: list[str], num_layers: int, sliding_window: int | None) -> None:
    """Raise ``ValueError`` unless ``layer_types`` names each layer SLIDING or GLOBAL, with a window
    set when any layer slides (the families with local layers: Gemma 2/3, Qwen)."""
    if len(layer_types) != num_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
    bad = set(layer_types) - {SLIDING, GLOBAL}
    if bad:
        raise ValueError(f"unknown layer_types {sorted(bad)}; use {SLIDING!r} or {GLOBAL!r}")
    if SLIDING in layer_types and not sliding_window:
        raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")


def attention_mask(
    q_pos: Tensor,
    kv_pos: Tensor,
    q_doc: Tensor | None = None,
    kv_doc: Tensor | None = None,
    sliding_window: int | None = None,
) -> Tensor:
    """Boolean mask [b, 1, s_q, s_kv], True where a query may attend to a key.

    Causal by position; with document ids (packing), also only within the same document; with a
    sliding window, also only to the last ``sliding_window`` positions.
    """
    allowed = kv_pos[:, None, :] <= q_pos[:, :, None]
    if q_doc is not None and kv_doc is not None:
        allowed = allowed & (kv_doc[:, None, :] == q_doc[:, :, None])
    if sliding_window is not None:
        allowed = allowed & (q_pos[:, :, None] - kv_pos[:, None, :] < sliding_window)
    return allowed[:, None]


def soft_cap(x: Tensor, cap: float) -> Tensor:
    """Squash ``x`` smoothly into (-cap, cap): ``cap · tanh(x / cap)`` (Gemma 2's scores and logits)."""
    return cap * torch.tanh(x / cap)


class _SoftmaxTo(torch.autograd.Function):
    """``softmax(x, -1).to(dtype)`` for fp32 scores x, keeping only the ``dtype`` output for backward.

    Plain autograd would keep the fp32 softmax output as well as its bf16 copy (the second matmul
    needs that one): 3× the bytes for the largest tensor attention saves. The softmax gradient
    ``p ⊙ (g − Σ p⊙g)`` is computed from the stored copy instead; exact in fp32 runs, and in bf16
    runs it carries the same rounding as the matmul that consumes p.
    """

    @staticmethod
    def forward(ctx: Any, scores: Tensor, dtype: torch.dtype) -> Tensor:
        probs = torch.softmax(scores, dim=-1).to(dtype)
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (probs,) = ctx.saved_tensors
        p, g = probs.float(), grad.float()
        return p * (g - (p * g).sum(dim=-1, keepdim=True)), None


# The split is measured at s = 256 (+8% tokens/s, BENCHMARKS.md); shorter rows, whose score matrix
# is small next to the extra kernels the split launches, stay on one path.
_CAUSAL_SPLIT_MIN_LEN = 128


def matmul_attention_keys_per_query(seq_len: int) -> float:
    """Probabilities ``matmul_attention`` keeps per query and head in training (t = s): s, or the
    average over the causal split, (⌊s/2⌋² + ⌈s/2⌉·s) / s ≈ ¾·s. The memory estimate uses this."""
    if seq_len < _CAUSAL_SPLIT_MIN_LEN:
        return float(seq_len)
    half = seq_len // 2
    return (half * half + (seq_len - half) * seq_len) / seq_len


def matmul_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, softcap: float | None = None
) -> Tensor:
    """Attention written out: ``softmax(q kᵀ · scale [+ soft-cap], masked) v``, grouped-query.

    The alternative to SDPA's fused kernel (``model.set_attention("matmul")``) and the only way to
    touch the scores between the matmuls (Gemma 2's soft-cap). The ``g = h / kvh`` query heads that
    share a key/value head are stacked into one [g·s, hd] matrix, so K and V are never repeated.
    Under ``torch.compile`` the scale, cap, mask and softmax become one fused kernel between two
    batched matmuls — on CPU and short sequences faster than SDPA's flash kernel — but the [s, t]
    probabilities of every head are kept for backward (memory grows with s², unlike SDPA's; only
    their copy in v's dtype is kept, see ``_SoftmaxTo``).

    Masks here are always causal in slot order (``attention_mask`` builds them from slot indices),
    so in training (t = s, no cache) the first half of the queries cannot see the second half of
    the keys: those queries are computed against ``keys[:s/2]`` only. That skips the quarter of the
    score matrix that is masked out anyway: a quarter fewer attention FLOPs and probability bytes
    kept for backward, with the same result to the bit (each row's softmax sees the same values).

    Args:
        q: Queries [b, h, s, hd].
        k, v: Keys and values [b, kvh, t, hd] (t = s, or cache + s when decoding).
        mask: Boolean [b, 1, s, t], True where a query may attend; ``None`` = plain causal.
        scale: Multiplies the scores (1/√hd for Llama).
        softcap: Gemma 2's ``c · tanh(scores / c)`` on the scaled scores; ``None`` = off.

    Returns:
        [b, h, s, hd], in q's dtype. Scores and softmax are computed in fp32.
    """
    s, t = q.shape[2], k.shape[2]
    if t != s or s < _CAUSAL_SPLIT_MIN_LEN:
        return _attend(q, k, v, mask, scale, softcap)
    half = s // 2
    first = _attend(q[:, :, :half], k[:, :, :half], v[:, :, :half],
                    None if mask is None else mask[:, :, :half, :half], scale, softcap)
    second = _attend(q[:, :, half:], k, v, None if mask is None else mask[:, :, half:], scale, softcap)
    return torch.cat((first, second), dim=2)


def _attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, softcap: float | None
) -> Tensor:
    """``matmul_attention`` for one block of queries: the last s query rows against all t keys."""
    b, h, s, hd = q.shape
    kvh, t = k.shape[1], k.shape[2]
    g = h // kvh
    scores = (q.reshape(b, kvh, g * s, hd) @ k.transpose(-2, -1)).float() * scale  # [b, kvh, g·s, t]
    if softcap is not None:
        scores = soft_cap(scores, softcap)
    if mask is None:  # plain causal: query row i sees keys 0..i + (t - s)
        mask = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s)
    else:
        mask = mask[:, :, None]  # [b, 1, 1, s, t]: the same for every head of a group
    scores = scores.view(b, kvh, g, s, t).masked_fill(~mask, torch.finfo(torch.float32).min)
    probs = _SoftmaxTo.apply(scores, v.dtype).view(b, kvh, g * s, t)
    return (probs @ v).view(b, h, s, hd)


class KVCache(nn.Module):
    """Keys and values of earlier positions, so decoding a token costs one position, not all.

    The buffers are allocated on the first ``update``, in the dtype and on the device of the keys
    it gets: under FSDP mixed precision (or CPU offload) those are the compute dtype and device,
    not the stored weights'.
    """

    def __init__(self, batch: int, max_len: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.shape = (batch, num_kv_heads, max_len, head_dim)
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.length = 0  # positions [0, length) hold valid entries

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v [b, kvh, s, hd]; return all keys/values so far, [b, kvh, length, hd]."""
        if self.k is None:
            self.k = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise RuntimeError(f"KV cache full: {end} positions > max_len {self.k.shape[2]}")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, through ``F.scaled_dot_product_attention``
    (or ``matmul_attention`` when ``use_sdpa`` is off; see ``CausalLM.set_attention``).

    Args:
        cfg: The model's shape.
        qkv_bias: Give the q, k and v projections a bias (Qwen2); Llama has none.
        sliding_window: Attend only to the last ``sliding_window`` positions (Mistral, Phi-3); the
            model builds the matching mask from this attribute.
    """

    def __init__(self, cfg: LlamaConfig, qkv_bias: bool = False, sliding_window: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.sliding_window = sliding_window
        self.kv_cache: KVCache | None = None
        self.use_sdpa = True

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries [b, h, s, hd], keys and values [b, kvh, s, hd] of ``x`` [b, s, d], before RoPE."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        b, s, _ = x.shape
        q, k, v = self.project(x)  # [b, h, s, hd], [b, kvh, s, hd] ×2
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(k, v)
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.num_kv_heads != self.num_heads
            )  # [b, h, s, hd]
        else:
            out = matmul_attention(q, k, v, mask, scale=self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: attention then MLP, each added to the residual stream.

    ``attn`` and ``mlp`` default to Llama's; the families built on Llama pass their own.
    """

    def __init__(self, cfg: LlamaConfig, attn: nn.Module | None = None, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = attn if attn is not None else Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = mlp if mlp is not None else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


class CausalLM(nn.Module):
    """What every decoder family shares: logits from hidden states, and the KV cache for generation.

    A family defines ``config``, ``tok_embeddings``, ``layers`` (each with an ``attn`` that reads
    ``attn.kv_cache``), ``output`` and ``hidden_states``; it overrides ``logits`` only if the head
    does more than project (Gemma 2 soft-caps).
    """

    config: Any
    tok_embeddings: nn.Embedding
    layers: nn.ModuleList
    output: nn.Linear

    def hidden_states(self, tokens: Tensor, *, positions: Tensor | None = None,
                      document_ids: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def logits(self, h: Tensor) -> Tensor:
        """Project hidden states [..., d] to vocabulary logits [..., v]."""
        return self.output(h)

    def forward(
        self, tokens: Tensor, *, positions: Tensor | None = None, document_ids: Tensor | None = None
    ) -> Tensor:
        """Logits [b, s, v] for tokens [b, s]; see ``hidden_states`` for the arguments."""
        return self.logits(self.hidden_states(tokens, positions=positions, document_ids=document_ids))

    def set_attention(self, implementation: str) -> None:
        """Choose how every layer computes attention.

        Args:
            implementation: ``sdpa`` (default): PyTorch's fused kernel (flash attention on GPU and
                CPU), memory linear in sequence length. ``matmul``: ``matmul_attention``, two batched
                matmuls and a softmax that ``torch.compile`` fuses; faster on CPU for short sequences,
                memory quadratic in sequence length.
        """
        if implementation not in ("sdpa", "matmul"):
            raise ValueError(f"attention must be 'sdpa' or 'matmul', got {implementation!r}")
        for layer in self.layers:
            layer.attn.use_sdpa = implementation == "sdpa"

    # -- KV cache for generation ------------------------------------------------------------------
    kv_left_padding: Tensor | None = None  # [b] pad slots before each row's prompt (batched generation)

    def setup_kv_cache(self, batch: int, max_len: int | None = None, left_padding: Tensor | None = None) -> None:
        """Give every attention layer an empty cache of ``max_len`` positions.

        Args:
            batch: Rows decoded together.
            max_len: Cache length (prompt + new tokens); defaults to ``config.max_seq_len``.
            left_padding: [batch] number of pad tokens in front of each row's prompt, when prompts of
                different lengths share one batch. Pad slots are masked out for the real tokens, and
                each row's positions start at 0 on its first real token, so a padded row computes
                what it would alone.
        """
        max_len = max_len or self.config.max_seq_len
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(batch, max_len, self.config.num_kv_heads, self.config.head_dim)
        self.kv_left_padding = left_padding

    def clear_kv_cache(self) -> None:
        """Drop the caches (back to training-style full-sequence forward)."""
        for layer in self.layers:
            layer.attn.kv_cache = None
        self.kv_left_padding = None

    def kv_cache_length(self) -> int:
        cache = self.layers[0].attn.kv_cache if len(self.layers) else None
        return cache.length if cache is not None else 0

    def cache_slots(self, b: int, s: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
        """Where ``s`` new tokens sit relative to the KV cache, for the attention mask and RoPE.

        Returns:
            ``(kv_slot, positions, real)``: the slot of every key, cached and new [b, t]
            (t = cache length + s); the default position of each new token [b, s] (its slot, minus
            the row's left padding); which keys are real tokens [b, t] (``None`` without padding).
        """
        kv_slot = torch.arange(self.kv_cache_length() + s, device=device).expand(b, -1)
        if self.kv_left_padding is None:
            return kv_slot, kv_slot[:, -s:], None
        pad = self.kv_left_padding.to(device)[:, None]
        return kv_slot, (kv_slot[:, -s:] - pad).clamp(min=0), kv_slot >= pad


class Llama(CausalLM):
    """A Llama-architecture causal LM: ``model(tokens)`` [b, s] → logits [b, s, v].

    ``hidden_states`` and ``logits`` are split out so a loss can project only the positions that
    carry a label, in chunks, instead of materialising the full [b, s, v] logits.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self.make_block(i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        self.reset_buffers()
        self.activation_checkpointing = False  # recompute each block in backward to save memory

    def make_block(self, layer: int) -> nn.Module:
        """Transformer block number ``layer`` (every Llama block is the same)."""
        return Block(self.config)

    def reset_buffers(self) -> None:
        """(Re)compute the RoPE frequencies, in fp32 on the model's device.

        Checkpoint loading builds the model on the meta device (no random init, no second copy of
        the weights) and calls this once the tensors are real; it also undoes a ``model.to(bf16)``
        that rounded the frequencies.
        """
        device = self.tok_embeddings.weight.device
        self.inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_theta, self.config.rope_scaling).to(device)

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """RoPE's cos and sin tables for ``positions`` [b, s], each [b, 1, s, hd]."""
        return rope_cos_sin(self.inv_freq, positions, dtype)

    def layer_mask(
        self, kv_slot: Tensor, s: int, document_ids: Tensor | None, real: Tensor | None, sliding_window: int | None
    ) -> Tensor | None:
        """The attention mask of layers with this ``sliding_window`` (``None``: global layers).

        Causal by slot (``kv_slot`` [b, t]: the slot of every key, cached and new; the last ``s`` are
        the queries); within a document when packed; with left padding (``real`` [b, t]: which slots
        hold real tokens) pads and real tokens never see each other; within the window when the keys
        reach past it. The window counts slots in the row (= position distance inside one document).
        ``None`` when attention is plain causal, which lets SDPA take its causal fast path.
        """
        t = kv_slot.shape[1]
        window = sliding_window if sliding_window is not None and t > sliding_window else None
        if document_ids is None and t == s and real is None and window is None:
            return None
        q_doc, kv_doc = (document_ids, document_ids) if real is None else (real[:, -s:], real)
        return attention_mask(kv_slot[:, -s:], kv_slot, q_doc, kv_doc, window)

    def hidden_states(
        self, tokens: Tensor, *, positions: Tensor | None = None, document_ids: Tensor | None = None
    ) -> Tensor:
        """Final-normed hidden states [b, s, d].

        Args:
            tokens: Token ids [b, s].
            positions: Position of each token [b, s]. Defaults to 0..s-1, or continues after the
                KV cache when one is set up. Packed sequences restart positions per document.
            document_ids: Document index of each token [b, s] for packed sequences; attention then
                stays within a document. ``None`` means one document per row (plain causal).
        """
        b, s = tokens.shape
        kv_slot, default_positions, real = self.cache_slots(b, s, tokens.device)
        positions = default_positions if positions is None else positions
        x = self.tok_embeddings(tokens)
        cos, sin = self.rope(positions, x.dtype)
        masks: dict[int | None, Tensor | None] = {}  # one per sliding window in use (None: global layers)
        for layer in self.layers:
            window = layer.attn.sliding_window
            if window not in masks:
                masks[window] = self.layer_mask(kv_slot, s, document_ids, real, window)
            mask = masks[window]
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.norm(x)
