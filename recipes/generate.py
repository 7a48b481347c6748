"""Chat with a base model, a base model + trained adapter, or a merged checkpoint.

    tune-run generate --config smollm2_135m prompt="Extract the person's name, age and city as JSON: ..."
    tune-run generate --config smollm2_135m            # interactive chat; empty line or Ctrl-D quits

It reads the same config as the training run, so it finds the newest adapter in ``output_dir`` by
itself (``adapter=none`` talks to the base model; ``adapter=PATH`` picks one; ``model=PATH/merged``
loads a merged checkpoint).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from tunesmith.models import load_peft_adapter
from tunesmith.models.generation import generate
from tunesmith.recipes.lora_single_device import Config as TrainingConfig
from tunesmith.training.checkpointing import find_adapter
from tunesmith.training.setup import load_model_and_tokenizer, select_device, select_dtype


@dataclass
class Config(TrainingConfig):
    """The training recipe's options plus these.

    Attributes:
        prompt: One user message to answer; unset starts an interactive chat.
        system: Optional system message.
        adapter: ``auto`` (newest checkpoint in output_dir, else none), ``none``, or a path to a PEFT
            adapter folder (or a checkpoint folder holding ``adapter/``).
        max_new_tokens: Longest answer.
        temperature: 0 decodes greedily; above 0 samples.
        top_p: Nucleus sampling: sample from the smallest set of tokens whose probability ≥ top_p.
    """

    prompt: str | None = None
    system: str | None = None
    adapter: str = "auto"
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0


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
