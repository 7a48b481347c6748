"""What a finished model is served from: a merged HF folder, GGUF files, the Hub. One path for every
training recipe's final checkpoint and for the export recipe.

    output_writers(model, tokenizer, merged=…, gguf=[…])  ─►  {subfolder: write(path)}
        merged/ (or hf/)   save_hf_checkpoint + write_tokenizer_files: weights, config.json, tokenizer files
                           with the chat template, generation_config.json (end-of-turn tokens as eos)
        gguf/              save_gguf per type (model-<type>.gguf) + the Ollama Modelfile beside them
    push_outputs(repo_id, folder, …)  ─►  one Hub commit: merged files at the top, GGUF files, adapter/, card

The writers stream: each merged tensor comes from ``merged_weights.iter_merged_tensors`` and is written
and freed before the next, so no writer holds a merged copy of the model. Under FSDP they are collective
(every rank runs them, in the same order, to the end; only the main rank writes files), which is how
``checkpointing.save_checkpoint`` / ``sharded_checkpoint.save_dcp_checkpoint`` call their
``collective_writers``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.data.gguf_vocab import gguf_tokenizer_metadata
from tunesmith.data.modelfile import write_modelfile
from tunesmith.data.tokenizer_files import write_tokenizer_files
from tunesmith.models.gguf_writer import gguf_file_name, save_gguf
from tunesmith.models.hf_checkpoint import save_hf_checkpoint
from tunesmith.models.merged_weights import iter_merged_tensors
from tunesmith.training.hub import model_card, push_to_hub

Writer = Callable[[Path], Any]


def output_writers(
    model: nn.Module,
    tokenizer: Any,
    *,
    merged: bool,
    gguf: Sequence[str] = (),
    merged_folder: str = "merged",
    merged_dtype: torch.dtype | None = None,
    tokenizer_dir: str | None = None,
    tokenizer_source: str | None = None,
    name: str | None = None,
    env: Any = None,
) -> dict[str, Writer]:
    """The writers of a model's serving outputs, ``{subfolder: write(folder)}``.

    Args:
        model: The trained model (LoRA layers are merged as written; NF4 bases dequantized), on one
            device or sharded by FSDP2 (then call every writer on every rank).
        tokenizer: The run's ``Tokenizer`` (its chat template and stop tokens are what is written).
        merged: Write the merged HF folder.
        gguf: GGUF file types (``FILE_TYPES`` keys); the Modelfile points at the first.
        merged_folder: The merged folder's name (``merged``; a full fine-tune's ``hf``).
        merged_dtype: dtype of the merged folder's weights; default: the model's.
        tokenizer_dir: The base's folder when its tokenizer files came from one (they are copied).
        tokenizer_source: Where the tokenizer was read from; a ``.gguf`` has its vocabulary copied verbatim.
        name: ``general.name`` in the GGUF files.
        env: The process group of a distributed run (``None``: one process).
    """
    main = env is None or not env.sharded or env.is_main
    writers: dict[str, Writer] = {}
    if merged:
        def write_merged(folder: Path) -> Path:
            save_hf_checkpoint(model, folder, dtype=merged_dtype, write_files=main)  # collective under FSDP
            if main:
                write_tokenizer_files(tokenizer, folder, source_dir=tokenizer_dir)
            return folder

        writers[merged_folder] = write_merged
    if gguf:
        def write_gguf(folder: Path) -> Path:
            base = tokenizer_source if tokenizer_source and tokenizer_source.endswith(".gguf") else None
            vocab = gguf_tokenizer_metadata(tokenizer, model.config.vocab_size, base=base) if main else None
            for file_type in gguf:
                if main:
                    save_gguf(model, folder / gguf_file_name(file_type), file_type, tokenizer=vocab, name=name)
                else:  # the other ranks take part in every gather, in the same order, and write nothing
                    for _ in iter_merged_tensors(model):
                        pass
            if main:
                write_modelfile(tokenizer, folder / gguf_file_name(gguf[0]))
            return folder

        writers["gguf"] = write_gguf
    return writers


def run_output_writers(cfg: Any, base: Any, model: nn.Module, *, merged_folder: str = "merged",
                       env: Any = None) -> dict[str, Writer]:
    """``output_writers`` for a training run's final checkpoint of ``model``, from its ``RunOptions``
    (``save_merged``, ``save_gguf``) and its loaded base (``setup.Pretrained``: tokenizer and sources)."""
    from tunesmith.training.setup import resolve_source

    return output_writers(model, base.tokenizer, merged=cfg.save_merged,
                          gguf=cfg.save_gguf, merged_folder=merged_folder, tokenizer_dir=base.tokenizer_dir,
                          tokenizer_source=resolve_source(cfg.tokenizer) if cfg.tokenizer else base.source,
                          name=Path(cfg.output_dir).name, env=env)


def hub_contents(folder: Path, merged_folder: str | None = "merged", adapter: Path | None = None) -> dict[str, Path]:
    """What goes to the Hub from an output folder: the merged model's files at the top (where
    ``from_pretrained(repo_id)`` looks), every GGUF file and the Modelfile beside them, ``adapter/``."""
    contents: dict[str, Path] = {}
    if merged_folder and (folder / merged_folder / "config.json").is_file():
        contents[""] = folder / merged_folder
    if (folder / "gguf").is_dir():
        contents |= {p.name: p for p in sorted((folder / "gguf").iterdir()) if p.is_file()}
    adapter = adapter or (folder / "adapter" if (folder / "adapter" / "adapter_config.json").is_file() else None)
    if adapter is not None:
        contents["adapter"] = adapter
    return contents


def push_outputs(repo_id: str, contents: Mapping[str, Path], *, base_model: str, run: Mapping[str, Any],
                 held_out: Mapping[str, float] | None = None, private: bool = True) -> str:
    """Upload ``contents`` (see ``hub_contents``) with a model card naming the base model, the training
    data, the run's config and the held-out scores; returns the commit URL."""
    import yaml

    card = model_card(repo_id, base_model=base_model, dataset=(run.get("data") or {}).get("train"),
                      config_yaml=yaml.safe_dump(dict(run), sort_keys=False) if run else None, held_out=held_out,
                      files=sorted(k or "merged model (top level)" for k in contents))
    return push_to_hub(repo_id, contents, card, private=private)


def push_run(cfg: Any, final_dir: Path, before: Any, after: Any, base_model: str, *, merged_folder: str = "merged",
             env: Any = None) -> str | None:
    """``push_to_hub=REPO`` at the end of a training run: the final checkpoint's adapter, merged folder and
    GGUF files with a card holding the held-out scores before and after training. Main rank only;
    returns the commit URL (``None`` when ``push_to_hub`` is unset or on the other ranks)."""
    from tunesmith.training.config import to_dict

    if not cfg.push_to_hub or (env is not None and env.sharded and not env.is_main):
        return None
    held_out = {f"{name} ({report.when})": value for report in (before, after) if report is not None
                for name, value in report.scores.items()}
    url = push_outputs(cfg.push_to_hub, hub_contents(final_dir, merged_folder), base_model=base_model,
                       run=to_dict(cfg), held_out=held_out, private=cfg.hub_private)
    print(f"pushed to {url}")
    return url
