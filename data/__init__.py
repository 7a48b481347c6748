"""tunesmith.data: tokenizers, chat templates, SFT datasets, collation and packing.

    load_tokenizer(source)       HF dir | Hub repo id | .gguf | .model  →  Tokenizer
    load_records(source, split)  .json / .jsonl / Hub dataset id        →  list of dicts
    SFTDataset(records, tok, ...)                                        →  {"tokens", "labels"} items
    pad_collate / pack_items / packed_collate                            →  batches
"""

from __future__ import annotations

import os
from typing import Any

from tunesmith.data.collate import IGNORE_INDEX, pad_collate
from tunesmith.data.datasets import DataError, Records, SFTDataset, load_records, split_records
from tunesmith.data.packing import pack_items, packed_collate
from tunesmith.data.tokenizer import TemplateError, Tokenizer, TokenizerError, TokenizerNotFoundError

# Files a tokenizer can need; anything else in a model repo (weights) is not downloaded.
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]


def load_tokenizer(source: str | Any) -> Tokenizer:
    """Load a tokenizer from wherever a model lives.

    Args:
        source: A local Hugging Face directory (tokenizer.json preferred, else tokenizer.model),
            a ``.gguf`` file (metadata vocabulary), a SentencePiece ``.model`` file, or a Hub repo
            id such as ``"HuggingFaceTB/SmolLM2-135M-Instruct"`` (only the tokenizer files are
            downloaded); or a ``gguf.GGUFReader`` already open on a ``.gguf`` file.

    Returns:
        The ``Tokenizer``.
    """
    if not isinstance(source, (str, os.PathLike)):  # an open GGUFReader
        from tunesmith.data.gguf_tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(source)
    source = os.fspath(source)
    if source.endswith(".gguf"):
        if not os.path.isfile(source):
            raise TokenizerNotFoundError(f"GGUF file not found: {source}")
        from tunesmith.data.gguf_tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(source)
    if source.endswith(".model") and os.path.isfile(source):
        return Tokenizer.from_sentencepiece(source)
    if os.path.isdir(source):
        return Tokenizer.from_hf_dir(source)
    if os.path.exists(source) or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise TokenizerNotFoundError(
            f"tokenizer source {source!r} is not a tokenizer directory, .gguf or .model file, "
            "nor a Hub repo id of the form 'owner/name'"
        )
    from huggingface_hub import snapshot_download

    local = snapshot_download(repo_id=source, allow_patterns=TOKENIZER_FILES)
    return Tokenizer.from_hf_dir(local)


__all__ = [
    "DataError",
    "IGNORE_INDEX",
    "Records",
    "SFTDataset",
    "TOKENIZER_FILES",
    "TemplateError",
    "Tokenizer",
    "TokenizerError",
    "load_records",
    "load_tokenizer",
    "pack_items",
    "pad_collate",
    "packed_collate",
    "split_records",
]
