"""Export a checkpoint for serving: a merged HF folder, GGUF files for llama.cpp / Ollama, the Hub.

    find the checkpoint (adapter + base, a full fine-tune's hf/, or a merged/ folder) and its run's config
    load the base (or the full model) and the tokenizer; put the adapter on
    merged/            HF layout (transformers, vLLM) + tokenizer files + generation_config.json
    gguf/model-T.gguf  for each requested type T, streamed tensor by tensor; gguf/Modelfile for Ollama
    push_to_hub        one commit: merged files at the top, GGUF files, adapter/, a model card

    tune-run export --config export checkpoint=output/smollm2_135m/step_000060 gguf=[f32,q8_0]
    ollama create my-model -f output/smollm2_135m/step_000060/export/gguf/Modelfile

Nothing in the checkpoint folder changes: everything is written to ``export_dir``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING

from tunesmith.models import load_peft_adapter
from tunesmith.training.config import ConfigError
from tunesmith.training.final_outputs import hub_contents, output_writers, push_outputs
from tunesmith.training.options import GgufType, HubRepo
from tunesmith.training.setup import DTYPES, load_model_and_tokenizer, resolve_source, select_device, select_dtype


@dataclass
class Config:
    """Options of the export recipe.

    Attributes:
        checkpoint: What to export: a run's step folder (``output/smollm2_135m/step_000060``, holding
            ``adapter/`` or a full fine-tune's ``hf/``), or an adapter, ``hf/`` or ``merged/`` folder itself.
        model: Base model of an adapter (HF folder, Hub id, ``.gguf``, ``package:…``); unset: the run's
            ``config.yaml`` next to the checkpoint, else the adapter's ``base_model_name_or_path``.
        tokenizer: Tokenizer source when it differs from the model's; unset: the run's.
        chat_template: Replace the chat template (chatml, llama3, llama2, gemma, or a Jinja file); unset:
            the run's. It goes into the merged folder, the GGUF metadata and the Modelfile.
        export_dir: Where everything is written; unset: ``export/`` in the checkpoint's step folder.
        merged: Write the merged model as a HF folder (``export_dir/merged``).
        merged_dtype: dtype of the merged folder's weights: fp32, bf16 or fp16.
        gguf: GGUF files to write, ``export_dir/gguf/model-<type>.gguf``: any of f32, f16, bf16, q8_0,
            q4_0, q4_1 (``[]``: none). The Ollama ``Modelfile`` beside them points at the first.
        name: The model's name in the GGUF metadata; unset: the run's folder name.
        push_to_hub: Hub repo id (``user/name``) to upload the merged files, GGUF files and adapter to,
            with a model card; unset: no upload. The token comes from ``HF_TOKEN``.
        hub_private: Create that repo private.
        device: Where the weights are merged: ``auto``, ``cpu``, ``cuda``.
        dtype: dtype the model is loaded and merged in: fp32 (exact merge) or bf16 (half the memory).
    """

    checkpoint: str = MISSING
    model: str | None = None
    tokenizer: str | None = None
    chat_template: str | None = None
    export_dir: str | None = None
    merged: bool = True
    merged_dtype: str = "bf16"
    gguf: list[GgufType] = field(default_factory=lambda: ["q8_0"])
    name: str | None = None
    push_to_hub: HubRepo | None = None
    hub_private: bool = True
    device: str = "cpu"
    dtype: str = "fp32"


@dataclass
class Checkpoint:
    """Where the pieces of a checkpoint are."""

    step_dir: Path  # the folder holding it; outputs default to step_dir / "export"
    adapter: Path | None  # a PEFT adapter folder, or None for a full model
    weights: str  # the base model of an adapter, or the full model's HF folder
    tokenizer: str  # where the tokenizer comes from
    chat_template: str | None
    run: dict[str, Any]  # the run's config.yaml (empty when there is none)


def find_checkpoint(cfg: Config) -> Checkpoint:
    """Locate adapter / HF folder, the run's config.yaml and the base model, from ``cfg.checkpoint``.

    Raises:
        ConfigError: the folder does not exist or holds none of the checkpoint kinds, or the base of an
            adapter cannot be found.
    """
    path = Path(cfg.checkpoint)
    if not path.is_dir():
        raise ConfigError(f"checkpoint={cfg.checkpoint}: no such folder")
    adapter = hf = None
    for sub in ("", "adapter"):
        if (path / sub / "adapter_config.json").is_file():
            adapter = path / sub
            break
    else:
        for sub in ("", "hf", "merged"):
            if (path / sub / "config.json").is_file():
                hf = path / sub
                break
    if adapter is None and hf is None:
        raise ConfigError(f"checkpoint={cfg.checkpoint}: no adapter (adapter_config.json) and no HF model "
                          "(config.json) in it or in its adapter/, hf/ or merged/ subfolder")
    step_dir = (adapter or hf).parent if (adapter or hf) == path else path
    run_file = step_dir / "config.yaml"
    run = yaml.safe_load(run_file.read_text()) if run_file.is_file() else {}
    if adapter is not None:
        recorded = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        weights = cfg.model or run.get("model") or recorded
        if not weights:
            raise ConfigError(f"checkpoint={cfg.checkpoint}: the adapter names no base model; set model=")
    else:
        weights = str(hf)
    has_tokenizer = adapter is None and any((hf / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    tokenizer = cfg.tokenizer or run.get("tokenizer") or (str(hf) if has_tokenizer else run.get("model") or weights)
    return Checkpoint(step_dir, adapter, resolve_source(weights), resolve_source(tokenizer),
                      cfg.chat_template or run.get("chat_template"), run)


def check_options(cfg: Config) -> None:
    """Reject an unknown dtype, or nothing to do, before anything is loaded (GGUF types are a Literal)."""
    if cfg.merged_dtype not in DTYPES:
        raise ConfigError(f"merged_dtype must be one of {', '.join(DTYPES)}; got '{cfg.merged_dtype}'")
    if not cfg.merged and not cfg.gguf:
        raise ConfigError("nothing to export: merged=false and gguf=[]")


def main(cfg: Config) -> dict[str, Any]:
    # ---- setup: find the checkpoint, load base + adapter (or the full model) and the tokenizer -----
    check_options(cfg)
    ckpt = find_checkpoint(cfg)
    device = select_device(cfg.device)
    base = load_model_and_tokenizer(ckpt.weights, ckpt.tokenizer, select_dtype(cfg.dtype, device), device,
                                    ckpt.chat_template)
    model, tokenizer = base.model, base.tokenizer
    if ckpt.adapter is not None:
        load_peft_adapter(model, ckpt.adapter)  # LoRA layers as adapter_config.json describes
    model.eval()
    export_dir = Path(cfg.export_dir) if cfg.export_dir else ckpt.step_dir / "export"
    name = cfg.name or ckpt.step_dir.parent.name or "tunesmith fine-tune"

    # ---- merged/ (weights, config, tokenizer files, generation config) and gguf/ (files + Modelfile) --
    # the same writers a training run's final checkpoint uses (training/final_outputs.py)
    writers = output_writers(model, tokenizer, merged=cfg.merged, gguf=cfg.gguf, merged_dtype=DTYPES[cfg.merged_dtype],
                             tokenizer_dir=base.tokenizer_dir, tokenizer_source=ckpt.tokenizer, name=name)
    for folder, write in writers.items():
        print(f"{folder}: {write(export_dir / folder)}")
    if cfg.gguf:
        print(f"Ollama: cd {export_dir / 'gguf'} && ollama create {name} -f Modelfile")
    written = hub_contents(export_dir, "merged" if cfg.merged else None, adapter=ckpt.adapter)

    # ---- the Hub -----------------------------------------------------------------------------------
    url = None
    if cfg.push_to_hub:
        url = push_outputs(cfg.push_to_hub, written, base_model=str(ckpt.run.get("model") or ckpt.weights),
                           run=ckpt.run, private=cfg.hub_private)
        print(f"pushed to {url}")
    return {"export_dir": export_dir, "files": written, "hub_commit": url}


if __name__ == "__main__":
    from tunesmith.training.cli import run_file

    sys.exit(run_file(__file__))
