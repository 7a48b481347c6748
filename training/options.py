"""Option groups that several recipes share, declared once (types, defaults, meaning).

A recipe's ``Config`` composes these with its own options; the YAML keys are the field names
(``lora.rank``, ``data.train``, …).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING


@dataclass
class DataOptions:
    """Where the supervised examples come from and how they become tokens.

    Attributes:
        train: A local ``.json``/``.jsonl`` file or a Hub dataset repo id.
        val: Held-out examples (same forms); when unset, ``val_fraction`` of ``train`` is held out.
        val_fraction: Share of ``train`` held out when ``val`` is unset.
        format: ``instruct`` (instruction/input/output records) or ``chat`` (``messages`` lists).
        split: Which split of a Hub dataset repo ``train`` reads.
        val_split: Which split of a Hub dataset repo ``val`` reads.
        train_on: ``assistant`` (loss on the answers only) or ``all`` (every token).
        max_seq_len: Longer examples are truncated to this many tokens.
        packing: Concatenate examples into rows of ``max_seq_len`` with per-document attention
            (no attention across examples; positions restart per example). Faster on short data.
    """

    train: str = MISSING
    val: str | None = None
    val_fraction: float = 0.1
    format: str = "instruct"
    split: str = "train"
    val_split: str = "validation"
    train_on: str = "assistant"
    max_seq_len: int = 512
    packing: bool = False


@dataclass
class LoRAOptions:
    """Low-rank adapters: ``W x + (alpha / rank) · B A x`` with A [rank, in], B [out, rank].

    Attributes:
        rank: Adapter rank.
        alpha: Scale numerator (the update is scaled by alpha / rank).
        dropout: Dropout on the adapter's input.
        targets: Linear layers that get adapters: any of q_proj k_proj v_proj o_proj gate_proj
            up_proj down_proj output.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
