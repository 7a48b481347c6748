"""Chat with a base model, a base model + trained adapter, or a merged checkpoint.

    tune-run generate --config smollm2_135m prompt="Extract the person's name, age and city as JSON: ..."
    tune-run generate --config smollm2_135m            # interactive chat; empty line or Ctrl-D quits

It reads the same config file as the training run (only the keys it declares: model, tokenizer,
chat_template, output_dir, device, dtype, seed; the training-only ones are skipped), so it finds
the newest adapter in ``output_dir`` by itself (``adapter=none`` talks to the base model;
``adapter=PATH`` picks one; ``model=PATH/merged`` loads a merged checkpoint). On the command line
only its own options are accepted.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch

from tunesmith.models import load_peft_adapter
from tunesmith.models.generation import generate
from tunesmith.training.checkpointing import find_adapter
from tunesmith.training.config import MISSING, NonNegativeFloat, NonNegativeInt, PositiveInt, Range
from tunesmith.training.options import ChatTemplate, Device, ModelSource, TokenizerSource
from tunesmith.training.setup import load_model_and_tokenizer, select_device, select_dtype


@dataclass
class Config:
    """Options of ``generate`` (YAML keys and ``key=value`` overrides use these names).

    Attributes:
        model: Base model (a local HF folder, Hub repo id, ``.gguf`` file or ``package:MODULE/FILE``),
            or a merged checkpoint folder (``output_dir/step_N/merged``; then ``adapter=none``).
        tokenizer: Tokenizer source when it differs from ``model``.
        chat_template: Override the tokenizer's chat template (a name in data/chat_templates.py or a Jinja file).
        output_dir: The training run's folder; ``adapter=auto`` takes its newest checkpoint's adapter.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16`` (inference only).
        seed: Seeds sampling.
        adapter: ``auto`` (newest checkpoint in output_dir, else none), ``none``, or a path to a PEFT
            adapter folder (or a checkpoint folder holding ``adapter/``).
        prompt: One user message to answer; unset starts an interactive chat.
        system: Optional system message.
        max_new_tokens: Longest answer.
        temperature: 0 decodes greedily; above 0 samples.
        top_p: Nucleus sampling: sample from the smallest set of tokens whose probability ≥ top_p.
    """

    reads_training_configs: ClassVar[bool] = True  # its config file is usually a training run's (tune-run
    # drops the training options it does not declare; see cli.own_file_values)

    model: ModelSource = MISSING
    tokenizer: TokenizerSource | None = None
    chat_template: ChatTemplate | None = None
    output_dir: str = "output/lora"
    device: Device = "auto"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: NonNegativeInt = 0
    adapter: str = "auto"
    prompt: str | None = None
    system: str | None = None
    max_new_tokens: PositiveInt = 256
    temperature: NonNegativeFloat = 0.0
    top_p: Annotated[float, Range(gt=0, le=1)] = 1.0

    def validate_environment(self) -> None:
        find_adapter(self.adapter, self.output_dir)  # a bad path is refused before the model loads


def main(cfg: Config) -> list[str]:
    device = select_device(cfg.device)
    dtype = select_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    base = load_model_and_tokenizer(cfg.model, cfg.tokenizer, dtype, device, cfg.chat_template)
    model, tokenizer = base.model, base.tokenizer
    adapter = find_adapter(cfg.adapter, cfg.output_dir, base_model=base.source)
    if adapter is not None:
        load_peft_adapter(model, adapter)  # adds LoRA layers as adapter_config.json describes
    print(f"model: {cfg.model}" + (f" + adapter {adapter}" if adapter else " (no adapter)"), file=sys.stderr)
    model.eval()
    generator = torch.Generator(device=device).manual_seed(cfg.seed)

    def answer(messages: list[dict[str, str]]) -> str:
        prompt = torch.tensor(tokenizer.apply_chat_template(messages, add_generation_prompt=True), device=device)
        new = generate(model, prompt, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                       top_p=cfg.top_p, stop_ids=tokenizer.stop_ids, generator=generator)
        return tokenizer.decode(new)

    history = [{"role": "system", "content": cfg.system}] if cfg.system else []
    if cfg.prompt is not None:
        reply = answer(history + [{"role": "user", "content": cfg.prompt}])
        print(reply)
        return [reply]
    replies = []
    print("chat: type a message, empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        history.append({"role": "user", "content": text})
        reply = answer(history)
        history.append({"role": "assistant", "content": reply})
        replies.append(reply)
        print(f"model> {reply}")
    return replies


if __name__ == "__main__":
    from tunesmith.training.cli import run_file

    sys.exit(run_file(__file__))
