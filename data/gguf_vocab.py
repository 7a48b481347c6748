"""A ``Tokenizer`` as GGUF ``tokenizer.*`` metadata, so llama.cpp and Ollama tokenize and chat like we do.

The inverse of ``gguf_tokenizer.py`` / ``gguf_spm_tokenizer.py``, in llama.cpp's vocabulary terms:

    byte-level BPE (SmolLM2, Llama 3)   model "gpt2": tokens in id order, merges, pre-tokenizer name
    SentencePiece-style BPE (Gemma,     model "llama": tokens in id order, scores (merge priority:
      Llama 2)                            higher merges first), no merges list
    both                                token types (1 normal, 2 unknown, 3 control, 4 user-defined,
                                          5 unused, 6 byte), special ids (BOS, EOS, end of turn, padding),
                                          add_bos/add_eos, chat template

When the tokenizer came from a GGUF file, that file's ``tokenizer.*`` entries are the most faithful
source (llama.cpp's SentencePiece tokenizer reads the original scores, which a rebuilt vocabulary only
reproduces up to order) and are copied as they are; only the chat template is ours, in case the run
replaced it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tunesmith.data.tokenizer import END_OF_TURN_TOKENS, Tokenizer
from tunesmith.data.tokenizer_files import adds_bos_eos, is_sentencepiece

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# llama.cpp's pre-tokenizer names whose splitting gguf_tokenizer rebuilds, tried in this order.
KNOWN_PRE = ("gpt2", "smollm", "llama-bpe", "qwen2", "tekken", "gpt-4o")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SPECIAL_SCORE = -1000.0  # what llama.cpp's converter gives control/user-defined/padding pieces


def gguf_tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int, base: Any = None) -> dict[str, Any]:
    """The ``tokenizer.*`` GGUF metadata of ``tokenizer``, its vocabulary padded to ``vocab_size``.

    Args:
        tokenizer: The tokenizer the model was trained with (its chat template is written).
        vocab_size: The model's embedding rows. Ids the tokenizer lacks become ``[PAD<id>]``
            pieces of type unused, as llama.cpp's converter writes them.
        base: The GGUF file (path or ``gguf.GGUFReader``) the tokenizer was read from, if it was:
            its ``tokenizer.*`` entries are copied verbatim.

    Returns:
        Key → plain Python value (str, bool, int, float or a list of one of them).

    Raises:
        ValueError: a vocabulary llama.cpp cannot express (an unknown pre-tokenizer, a model other
            than BPE), or more tokens than the model has embedding rows.
    """
    if base is not None:
        meta = _copy_from_gguf(base)
    elif is_sentencepiece(tokenizer):
        meta = _from_sentencepiece(tokenizer)
    else:
        meta = _from_tokenizers(tokenizer)
    if tokenizer.chat_template:
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    else:
        meta.pop("tokenizer.chat_template", None)
    return _pad(meta, vocab_size)


def _copy_from_gguf(base: Any) -> dict[str, Any]:
    import gguf

    reader = base if isinstance(base, gguf.GGUFReader) else gguf.GGUFReader(base)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def _special_ids(tokenizer: Tokenizer) -> dict[str, Any]:
    """BOS/EOS/padding ids and whether ``encode`` adds BOS/EOS, as llama.cpp's keys."""
    add_bos, add_eos = adds_bos_eos(tokenizer)
    meta: dict[str, Any] = {"tokenizer.ggml.add_bos_token": add_bos, "tokenizer.ggml.add_eos_token": add_eos}
    # End of turn: what ends an assistant reply in the chat format (<|im_end|>, <|end|>, ...), which can
    # differ from EOS (Phi-3's <|endoftext|>); llama.cpp stops generating at either.
    eot = next((i for i in map(tokenizer.token_to_id, END_OF_TURN_TOKENS) if i is not None), None)
    for key, value in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("eot", eot),
                       ("padding", tokenizer.token_to_id(tokenizer.pad_token))):
        if value is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = value
    return meta


def _pre_name(pre_tokenizer: dict[str, Any] | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level pre-tokenizer (its JSON), by matching it
    against the ones gguf_tokenizer builds for each name (``trim_offsets`` only moves offsets)."""
    import tokenizers

    from tunesmith.data.gguf_tokenizer import _pre_tokenizer

    def canonical(d: Any) -> Any:
        if isinstance(d, dict):
            if d.get("type") == "Split" and d.get("behavior") == "Removed" and d.get("invert"):
                # Keeping only the matches (tiktoken conversions) = isolating them, since these patterns
                # match every character (each ends in ``\s+`` after a catch-all for punctuation).
                d = {**d, "behavior": "Isolated", "invert": False}
            return {k: canonical(v) for k, v in d.items() if k != "trim_offsets"}
        if isinstance(d, list):
            return [canonical(v) for v in d]
        return d

    probe = tokenizers.Tokenizer(tokenizers.models.BPE())
    target = canonical(pre_tokenizer)
    for name in KNOWN_PRE:
        probe.pre_tokenizer = _pre_tokenizer(name)
        if canonical(json.loads(probe.to_str())["pre_tokenizer"]) == target:
            return name
    raise ValueError(
        f"the tokenizer's pre-tokenizer {json.dumps(pre_tokenizer)[:200]} is none of llama.cpp's {list(KNOWN_PRE)} "
        "that tunesmith knows; llama.cpp would split text differently, so no GGUF vocabulary is written"
    )


def _from_tokenizers(tokenizer: Tokenizer) -> dict[str, Any]:
    """A ``tokenizers`` BPE: byte-level → ``gpt2``; with byte fallback (SentencePiece-style) → ``llama``."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer model {model.get('type')!r}: only BPE vocabularies can be written to GGUF")
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(max(by_id) + 1)]
    unk = model.get("unk_token")

    def kind(i: int, token: str) -> int:
        if i in added:
            return CONTROL if added[i]["special"] else USER_DEFINED
        if i not in by_id:
            return UNUSED
        if token == unk:
            return UNKNOWN
        if model.get("byte_fallback") and _BYTE_PIECE.fullmatch(token):
            return BYTE
        return NORMAL

    types = [kind(i, t) for i, t in enumerate(tokens)]
    meta: dict[str, Any] = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}
    if model.get("byte_fallback"):  # SentencePiece-style: llama.cpp merges by score, best (highest) first
        meta["tokenizer.ggml.model"] = "llama"
        meta["tokenizer.ggml.pre"] = "default"
        meta["tokenizer.ggml.scores"] = [
            float(-i) if k == NORMAL else 0.0 if k == BYTE else SPECIAL_SCORE for i, k in enumerate(types)
        ]
        meta["tokenizer.ggml.add_space_prefix"] = _prepends_space(spec)
    else:
        meta["tokenizer.ggml.model"] = "gpt2"
        meta["tokenizer.ggml.pre"] = _pre_name(spec.get("pre_tokenizer"))
        meta["tokenizer.ggml.merges"] = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    if unk is not None and unk in model["vocab"]:
        meta["tokenizer.ggml.unknown_token_id"] = model["vocab"][unk]
    return meta | _special_ids(tokenizer)


def _prepends_space(spec: dict[str, Any]) -> bool:
    """Whether a SentencePiece-style ``tokenizer.json`` puts "▁" in front of the text (llama.cpp's
    ``add_space_prefix``): by a Metaspace pre-tokenizer (Llama 2 as transformers saves it) or by a
    ``Prepend("▁")`` normalizer (Phi-3's and Mistral's released files, which have no pre-tokenizer)."""
    pre = spec.get("pre_tokenizer") or {}
    normalizer = spec.get("normalizer") or {}
    steps = [normalizer, *normalizer.get("normalizers", [])]
    return (pre.get("type") == "Metaspace" and pre.get("prepend_scheme") != "never") or any(
        n.get("type") == "Prepend" and n.get("prepend") == "\u2581" for n in steps)


def _from_sentencepiece(tokenizer: Tokenizer) -> dict[str, Any]:
    """A SentencePiece model (``tokenizer.model``): its pieces, scores and types as they are (the
    proto's piece types are numbered as llama.cpp's token types)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.backend.serialized_model_proto())
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
        "tokenizer.ggml.scores": [float(p.score) for p in proto.pieces],
        "tokenizer.ggml.token_type": [int(p.type) for p in proto.pieces],
        "tokenizer.ggml.add_space_prefix": bool(proto.normalizer_spec.add_dummy_prefix),
    }
    if tokenizer.backend.unk_id() >= 0:
        meta["tokenizer.ggml.unknown_token_id"] = tokenizer.backend.unk_id()
    return meta | _special_ids(tokenizer)


def _pad(meta: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    tokens = meta["tokenizer.ggml.tokens"]
    if len(tokens) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size} embedding rows")
    missing = range(len(tokens), vocab_size)
    meta["tokenizer.ggml.tokens"] = list(tokens) + [f"[PAD{i}]" for i in missing]
    meta["tokenizer.ggml.token_type"] = list(meta["tokenizer.ggml.token_type"]) + [UNUSED] * len(missing)
    if "tokenizer.ggml.scores" in meta:
        meta["tokenizer.ggml.scores"] = list(meta["tokenizer.ggml.scores"]) + [SPECIAL_SCORE] * len(missing)
    return meta
