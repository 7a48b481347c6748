"""LoRA: train a low-rank update next to a frozen linear layer (Hu et al. 2021), and QLoRA.

    x ─┬─► W x  (frozen; dense, or NF4 for QLoRA) ─────────────────────┐
       └─► dropout ─► A (in → r) ─► B (r → out) ─► × alpha / r ─────────┴─► y

``B`` starts at zero, so a fresh adapter leaves the model unchanged; ``A`` starts like an
``nn.Linear`` (Kaiming-uniform, a = √5: U(-1/√in, 1/√in)), as PEFT does, so the first gradient
step on ``B`` is not zero. ``apply_lora`` draws each layer's ``A`` from a generator seeded by
(seed, layer name) (``lora_a_init``), so the starting adapters do not depend on the device, on
the order layers are built in, or on how many processes share the model (FSDP: each rank draws a
layer's whole, small ``A`` and keeps its rows). After training, ``W + (alpha/r) B A`` can be folded into the base weight ("merge") so
inference costs nothing extra.

``LoRALinear`` holds the base ``weight`` itself rather than wrapping an ``nn.Linear``, so a
model's state-dict keys for base weights are the same with or without LoRA
(``layers.0.attn.q_proj.weight``), and the adapter adds ``…q_proj.lora_a.weight`` and
``…q_proj.lora_b.weight``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tunesmith.models import nf4

# Leaf names of the linear layers in our models that LoRA may target (Llama, Gemma, Qwen, Mistral).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "output")
# Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj, as its HF checkpoint does; it has
# o_proj, down_proj and output but none of the fused layers' parts.
FUSED_LORA_TARGETS = ("qkv_proj", "gate_up_proj")


class LoRATargetError(ValueError):
    """LoRA targets that name no layer of the model (a user's config, not a bug: the CLI exits 2)."""


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    Args:
        in_dim: Input features.
        out_dim: Output features.
        rank: Rank r of the update (columns of A / rows of B).
        alpha: Scale numerator; the update is multiplied by ``alpha / rank``.
        dropout: Dropout probability on the adapter's input only (the base path sees plain x).
        bias: Whether the frozen base has a bias.
        quantize_base: Store the frozen base weight as NF4 (QLoRA); see ``tunesmith.models.nf4``.

    Attributes:
        disabled: When True, forward skips the adapter (base model only).
        merged: True after ``merge()``: the update lives in ``weight`` and forward skips the adapter.
        weight_is_shared: Set by ``apply_lora`` when the base weight is also used elsewhere (a
            tied output head shares the token embedding); merging is then refused.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        bias: bool = False,
        quantize_base: bool = False,
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
        self.in_dim, self.out_dim, self.rank, self.alpha = in_dim, out_dim, rank, alpha
        self.scaling = alpha / rank
        # Base layer, initialised like nn.Linear so a standalone LoRALinear is usable; a
        # checkpoint load (or from_linear) replaces it.
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim), requires_grad=False)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(out_dim), requires_grad=False) if bias else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_a = nn.Linear(in_dim, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_dim, bias=False)
        self.reset_lora_parameters()
        self.disabled = False
        self.merged = False
        self.weight_is_shared = False
        if quantize_base:
            self.quantize_base_()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, quantize_base: bool = False,
        init_a: Tensor | None = None,
    ) -> LoRALinear:
        """Wrap an existing ``nn.Linear``, reusing its weight (and bias) Parameter, not a copy.

        The adapter is created on the weight's device and in its dtype (on the meta device it
        stays uninitialised: the sharded loader fills it).

        Args:
            init_a: Starting value of ``A`` [rank, in] (``lora_a_init``); default: drawn from the
                global RNG like ``nn.Linear``.
        """
        w = linear.weight
        # Build the shell on the meta device so the placeholder base weight costs no memory.
        with torch.device("meta"):
            module = cls(linear.in_features, linear.out_features, rank, alpha, dropout, bias=linear.bias is not None)
        module.weight = linear.weight
        module.weight.requires_grad_(False)
        if linear.bias is not None:
            module.bias = linear.bias
            module.bias.requires_grad_(False)
        module.lora_a = nn.Linear(linear.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        module.lora_b = nn.Linear(rank, linear.out_features, bias=False, device=w.device, dtype=w.dtype)
        if not w.is_meta:
            module.reset_lora_parameters(init_a)
        if quantize_base:
            module.quantize_base_()
        return module

    def reset_lora_parameters(self, init_a: Tensor | None = None) -> None:
        """A like nn.Linear / PEFT (Kaiming-uniform, a=√5) or ``init_a``; B = 0 so the update starts at zero."""
        with torch.no_grad():
            if init_a is None:
                nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
            else:
                self.lora_a.weight.copy_(init_a)
        nn.init.zeros_(self.lora_b.weight)

    @property
    def is_quantized(self) -> bool:
        """True when the base weight is stored as NF4."""
        return nf4.is_nf4(self.weight)

    def quantize_base_(self) -> None:
        """Replace the dense base weight with its NF4 quantization (in place, frozen)."""
        if self.merged:
            raise RuntimeError("unmerge() the adapter before quantizing the base weight")
        if not self.is_quantized:
            self.weight = nn.Parameter(nf4.to_nf4(self.weight), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [..., in] → [..., out]."""
        if self.is_quantized:
            out = nf4.linear_nf4(x, self.weight)
            if self.bias is not None:
                out = out + self.bias
        else:
            out = F.linear(x, self.weight, self.bias)
        if self.disabled or self.merged:
            return out
        return out + self.scaling * self.lora_b(self.lora_a(self.dropout(x)))

    # -- merging ----------------------------------------------------------------------------------
    def _delta_fp32(self) -> Tensor:
        """The update ``scaling · B A`` [out, in] in fp32 (bf16 would round it into the weight badly)."""
        return self.scaling * (self.lora_b.weight.float() @ self.lora_a.weight.float())

    def merged_weight(self) -> Tensor:
        """Dense ``W + scaling · B A`` in the base dtype, without changing the module.

        Works for NF4 bases too (dequantized first), which is how a QLoRA model is saved merged.
        Returns the plain base weight when already merged.
        """
        with torch.no_grad():
            base = nf4.dequantize(self.weight) if self.is_quantized else self.weight.detach()
            if self.merged:
                return base.clone()
            return (base.float() + self._delta_fp32()).to(base.dtype)

    def merge(self) -> None:
        """Fold the update into ``weight`` in place; forward then skips the adapter."""
        if self.merged:
            raise RuntimeError("LoRA adapter is already merged")
        if self.is_quantized:
            raise RuntimeError(
                "cannot merge LoRA into an NF4-quantized base weight in place (re-quantizing would lose the "
                "update); use merged_weight() to get the dense merged weight, as the checkpoint writer does"
            )
        if self.weight_is_shared:
            raise RuntimeError(
                "cannot merge LoRA into this layer: its weight is shared with another module (a tied output "
                "head shares the token embedding), so merging would change the input embedding too; save the "
                "adapter separately or untie the embeddings first"
            )
        with torch.no_grad():
            self.weight.copy_((self.weight.float() + self._delta_fp32()).to(self.weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the update from ``weight`` again (exact up to float rounding)."""
        if not self.merged:
            raise RuntimeError("LoRA adapter is not merged")
        with torch.no_grad():
            self.weight.copy_((self.weight.float() - self._delta_fp32()).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        base = "nf4" if self.is_quantized else str(self.weight.dtype).removeprefix("torch.")
        return f"in={self.in_dim}, out={self.out_dim}, rank={self.rank}, alpha={self.alpha}, base={base}"


# -- model-level helpers ----------------------------------------------------------------------------
def lora_a_init(name: str, shape: tuple[int, int], seed: int) -> Tensor:
    """The starting ``A`` [rank, in] of the adapter on layer ``name``: fp32 on the CPU, cast by the caller.

    Kaiming-uniform with a = √5 (PEFT's and ``nn.Linear``'s statistics: U(-1/√in, 1/√in)), drawn
    from a generator seeded by a hash of (``seed``, ``name``), so every process and device gets
    the same values for the same layer, whatever else it has drawn before.
    """
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    bound = 1.0 / math.sqrt(shape[1])
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=g)


def _lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def apply_lora(
    model: nn.Module,
    targets: list[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    quantize_base: bool = False,
    seed: int = 0,
) -> nn.Module:
    """Swap every ``nn.Linear`` whose leaf name is in ``targets`` for a ``LoRALinear``, in place.

    Afterwards only the adapters (``lora_a``/``lora_b``) require grad; everything else, including
    norms and embeddings, is frozen.

    With ``quantize_base`` the swapped layers' base weights become NF4 (QLoRA). Call it after the
    weights are loaded and after any dtype cast (``model.to(dtype)`` would dequantize NF4 weights).
    A weight shared with another module (a tied output head) stays dense: the embedding needs the
    dense matrix anyway, so an NF4 copy would add memory instead of saving it.

    Args:
        model: The model to modify.
        targets: Leaf names of layers to adapt, from ``LORA_TARGETS`` or ``FUSED_LORA_TARGETS``.
        rank: LoRA rank.
        alpha: LoRA alpha (update scale is ``alpha / rank``).
        dropout: Dropout on the adapter input.
        quantize_base: Store the adapted layers' base weights as NF4.
        seed: Seeds each layer's ``A`` together with the layer's name (``lora_a_init``).

    Returns:
        The same model object.

    Raises:
        ValueError: For unknown target names, or targets this model has no layer of (``q_proj`` on
            Phi-3, whose attention is one fused ``qkv_proj``): the message lists the model's own.
    """
    valid = LORA_TARGETS + FUSED_LORA_TARGETS
    unknown = sorted(set(targets) - set(valid))
    if unknown:
        raise LoRATargetError(f"unknown LoRA target(s) {unknown}; valid targets are {list(valid)}")
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    absent = [t for t in targets if t not in present]
    if absent:
        own = [t for t in valid if t in present]
        raise LoRATargetError(f"LoRA target(s) {absent} are not layers of {type(model).__name__}; set lora.targets "
                              f"to some of its own: {own}")
    # How many times each Parameter appears in the model; > 1 means shared (tied embeddings).
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1

    to_swap = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    if not to_swap:
        raise LoRATargetError(f"LoRA targets {targets} match no nn.Linear layer in {type(model).__name__}")
    for name, linear in to_swap:
        shared = uses[id(linear.weight)] > 1
        init_a = None if linear.weight.is_meta else lora_a_init(name, (rank, linear.in_features), seed)
        lora = LoRALinear.from_linear(linear, rank, alpha, dropout, quantize_base=quantize_base and not shared,
                                      init_a=init_a)
        lora.weight_is_shared = shared
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, lora)

    for pname, p in model.named_parameters():
        p.requires_grad_(bool({"lora_a", "lora_b"} & set(pname.split("."))))
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors, under our names (``layers.0.attn.q_proj.lora_a.weight``)."""
    sd = {}
    for name, module in _lora_modules(model):
        prefix = f"{name}." if name else ""
        sd[f"{prefix}lora_a.weight"] = module.lora_a.weight.detach()
        sd[f"{prefix}lora_b.weight"] = module.lora_b.weight.detach()
    return sd


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Copy adapter tensors into ``model`` (strict: same names and shapes as ``lora_state_dict``).

    Raises:
        KeyError: Naming missing or unexpected keys.
        ValueError: Naming the first key whose shape differs.
    """
    own = lora_state_dict(model)
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise KeyError(
            f"LoRA state dict does not match the model: missing {missing[:5]}{' …' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}; were the adapters created with "
            "the same targets?"
        )
    for key, value in state_dict.items():
        if value.shape != own[key].shape:
            raise ValueError(
                f"LoRA tensor {key!r} has shape {tuple(value.shape)} but the model expects "
                f"{tuple(own[key].shape)}; was it trained with a different rank?"
            )
    with torch.no_grad():
        for key, value in state_dict.items():
            own[key].copy_(value)


def merge_lora(model: nn.Module) -> None:
    """Merge every adapter into its base weight (see ``LoRALinear.merge``)."""
    for _, module in _lora_modules(model):
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo ``merge_lora``."""
    for _, module in _lora_modules(model):
        module.unmerge()


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model inside the block (DPO's reference model, for one).

    Raises:
        RuntimeError: If an adapter is merged (its update is then inside the base weight).
    """
    modules = [m for _, m in _lora_modules(model)]
    if any(m.merged for m in modules):
        raise RuntimeError("cannot disable merged LoRA adapters; call unmerge_lora(model) first")
    previous = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was_disabled in zip(modules, previous):
            m.disabled = was_disabled


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` (after ``apply_lora``: the adapters only)."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` element counts; tied weights count once, NF4 weights by logical size."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
