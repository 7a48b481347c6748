"""The tokenizer side of a saved Hugging Face model folder, so it loads with nothing beside it.

    write_tokenizer_files(tokenizer, out_dir, source_dir=None)
        source_dir has tokenizer files  → copy them (what transformers did with the base, it does again)
        otherwise (a GGUF base, …)       → tokenizer.json from our tokenizers pipeline (or tokenizer.model),
                                           tokenizer_config.json, special_tokens_map.json
        either way                       → the run's chat template, and generation_config.json

``generation_config.json`` lists every end-of-turn token as ``eos_token_id``, so ``transformers``'
``generate`` and vLLM stop at the end of the assistant's turn, not only at the end of the text.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tunesmith.data import TOKENIZER_FILES as TOKENIZER_ONLY
from tunesmith.data.tokenizer import Tokenizer

# What a saved model folder carries beside its weights: the tokenizer's files and the generation config.
TOKENIZER_FILES = (*TOKENIZER_ONLY, "generation_config.json")


def write_tokenizer_files(tokenizer: Tokenizer, out_dir: str | Path, source_dir: str | Path | None = None) -> list[Path]:
    """Write ``tokenizer``'s files and ``generation_config.json`` into the model folder ``out_dir``.

    Args:
        tokenizer: The tokenizer the model was trained with (its chat template is what is written).
        out_dir: The saved model's folder (it exists).
        source_dir: The base model's folder, when its tokenizer came from one: its files are copied.

    Returns:
        The files written.
    """
    out_dir = Path(out_dir)
    copied = [Path(source_dir) / f for f in TOKENIZER_FILES if source_dir is not None and (Path(source_dir) / f).is_file()]
    if any(p.name != "generation_config.json" for p in copied):
        for src in copied:
            shutil.copy2(src, out_dir / src.name)
        _set_chat_template(out_dir, tokenizer.chat_template)
    else:
        _write_from_tokenizer(tokenizer, out_dir)
    write_generation_config(tokenizer, out_dir)
    return sorted(p for p in out_dir.iterdir() if p.name in TOKENIZER_FILES)


def write_generation_config(tokenizer: Tokenizer, out_dir: str | Path) -> Path:
    """Write (or complete) ``generation_config.json``: BOS, pad and every stop token as ``eos_token_id``.

    An existing file (copied from the base) keeps its sampling settings; its ``eos_token_id`` gains the
    tokenizer's end-of-turn tokens (``Tokenizer.stop_ids``).
    """
    path = Path(out_dir) / "generation_config.json"
    config: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    eos = config.get("eos_token_id")
    stops = list(dict.fromkeys([*(eos if isinstance(eos, list) else [] if eos is None else [eos]), *tokenizer.stop_ids]))
    if stops:
        config["eos_token_id"] = stops if len(stops) > 1 else stops[0]
    if tokenizer.bos_id is not None:
        config.setdefault("bos_token_id", tokenizer.bos_id)
    config.setdefault("pad_token_id", tokenizer.pad_id)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def _set_chat_template(out_dir: Path, template: str | None) -> None:
    """Make the copied files carry ``template`` (a run may replace the base's chat template)."""
    if template is None:
        return
    jinja = out_dir / "chat_template.jinja"
    if jinja.is_file():  # transformers reads this file first
        if jinja.read_text() != template:
            jinja.write_text(template)
        return
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if config.get("chat_template") != template:
        config["chat_template"] = template
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _write_from_tokenizer(tokenizer: Tokenizer, out_dir: Path) -> None:
    """tokenizer.json (or tokenizer.model) + tokenizer_config.json + special_tokens_map.json from ``tokenizer``.

    A ``tokenizers`` pipeline is saved as it is, post-processor (BOS/EOS) included, and named with
    transformers' generic class, which runs the file unchanged (a model-specific class could rebuild
    parts of it). A SentencePiece model is saved as ``tokenizer.model``; transformers then picks the
    tokenizer class from ``config.json``'s ``model_type``.
    """
    specials = {k: v for k, v in (("bos_token", tokenizer.bos_token), ("eos_token", tokenizer.eos_token),
                                  ("pad_token", tokenizer.pad_token)) if v is not None}
    add_bos, add_eos = adds_bos_eos(tokenizer)
    config: dict[str, Any] = {**specials, "add_bos_token": add_bos, "add_eos_token": add_eos,
                              "clean_up_tokenization_spaces": False}
    if is_sentencepiece(tokenizer):
        (out_dir / "tokenizer.model").write_bytes(tokenizer.backend.serialized_model_proto())
        config["legacy"] = False
    else:
        tokenizer.backend.save(str(out_dir / "tokenizer.json"))
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n")


def adds_bos_eos(tokenizer: Tokenizer) -> tuple[bool, bool]:
    """Whether ``tokenizer.encode`` puts BOS in front / EOS at the end (its post-processor decides)."""
    plain, full = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a")
    extra = len(full) > len(plain)
    return (extra and tokenizer.bos_id is not None and full[0] == tokenizer.bos_id,
            extra and tokenizer.eos_id is not None and full[-1] == tokenizer.eos_id)


def is_sentencepiece(tokenizer: Tokenizer) -> bool:
    """True when the tokenizer runs a SentencePiece model (not a ``tokenizers`` pipeline)."""
    return hasattr(tokenizer.backend, "serialized_model_proto")
