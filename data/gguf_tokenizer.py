"""Build a ``Tokenizer`` from a GGUF file's metadata (the file carries no tokenizer.json).

llama.cpp stores the vocabulary under ``tokenizer.ggml.*``:

    model       "gpt2" = byte-level BPE (SmolLM2, Llama 3, Qwen) | "llama" = SentencePiece (Llama 2, Gemma)
    pre         how text is split before BPE ("smollm", "llama-bpe", "qwen2", "tekken", "gpt-4o", ...)
    tokens      the vocabulary, id order; byte-level tokens already spelled in GPT-2's byte alphabet
    token_type  1 normal, 2 unknown, 3 control (special), 4 user-defined, 5 unused, 6 byte
    merges      "a b" pairs, best first
    bos/eos/padding_token_id, add_bos_token, add_eos_token; and ``tokenizer.chat_template``.

Here we rebuild the byte-level BPE case as a ``tokenizers.Tokenizer``. SentencePiece-style
vocabularies are built in ``gguf_spm_tokenizer.py``.
"""

from __future__ import annotations

import warnings
from typing import Any

from tunesmith.data.tokenizer import Tokenizer

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# Split patterns of llama.cpp's pre-tokenizer types that are not GPT-2's own regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Mistral's Tekken (Mistral NeMo, Small 3, …: model_type "mistral"): case-aware words, single digits.
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# OpenAI's o200k (llama.cpp's "gpt-4o"; Phi-4-mini's tokenizer): Tekken's words with contractions, 3-digit numbers.
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def gguf_field(reader, key: str, default: Any = None) -> Any:
    """A metadata value from a ``gguf.GGUFReader`` (scalars, strings and arrays as Python values)."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _pre_tokenizer(pre: str | None):
    """The pre-tokenizer llama.cpp uses for ``tokenizer.ggml.pre`` (what the merges were learned on)."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex
    if pre in (None, "default", "gpt2"):
        return byte_level
    if pre == "smollm":
        # SmolLM2's tokenizer.json: every digit is its own pre-token, then GPT-2's split.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
             "qwen2": _QWEN2_SPLIT, "tekken": _TEKKEN_SPLIT, "gpt-4o": _GPT4O_SPLIT}.get(pre)
    if split is None:
        warnings.warn(f"GGUF tokenizer.ggml.pre={pre!r} is not known here; splitting text with GPT-2's regex. "
                      "Add its pattern to tunesmith/data/gguf_tokenizer.py if tokens differ from llama.cpp's.")
        return byte_level
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _byte_level_tokenizer(reader):
    """A ``tokenizers.Tokenizer`` for ``tokenizer.ggml.model == "gpt2"``."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models

    tokens: list[str] = gguf_field(reader, "tokenizer.ggml.tokens")
    types: list[int] = gguf_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges", [])]
    pre = gguf_field(reader, "tokenizer.ggml.pre")

    # Ordinary tokens must be spelled in GPT-2's byte alphabet; re-spell the odd one that is not
    # (raw UTF-8 text in some converters). Control/user-defined tokens keep their text: they are
    # matched whole in the input, and their vocabulary entry must equal that text.
    alphabet = _bytes_to_unicode()
    spelled = set(alphabet.values())
    vocab = {}
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind not in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED) and not set(tok) <= spelled:
            tok = "".join(alphabet[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)

    tok = HFTokenizer(models.BPE(vocab, merges, ignore_merges=pre in ("llama-bpe", "llama3", "llama-v3")))
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([
        AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_TYPE_CONTROL
    ])
    tok.add_tokens([
        AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_TYPE_USER_DEFINED
    ])
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (printable bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def tokenizer_from_gguf(source) -> Tokenizer:
    """Build the tokenizer a GGUF file describes.

    Args:
        source: Path to a ``.gguf`` file, or an open ``gguf.GGUFReader``.

    Returns:
        A ``Tokenizer`` with the file's special tokens, BOS policy and chat template.
    """
    from gguf import GGUFReader

    is_path = isinstance(source, str) or hasattr(source, "__fspath__")
    reader = GGUFReader(source) if is_path else source
    name = str(source) if is_path else "GGUF file"
    kind = gguf_field(reader, "tokenizer.ggml.model")
    if kind == "llama":
        try:
            from tunesmith.data.gguf_spm_tokenizer import tokenizer_from_gguf_spm
        except ImportError as e:
            raise NotImplementedError(
                f"{name}: SentencePiece GGUF vocabularies (tokenizer.ggml.model='llama') need "
                "tunesmith/data/gguf_spm_tokenizer.py, which is not available in this install"
            ) from e
        return tokenizer_from_gguf_spm(reader)
    if kind != "gpt2":
        raise ValueError(f"{name}: GGUF tokenizer.ggml.model={kind!r} is not supported (supported: 'gpt2', 'llama')")

    tokens = gguf_field(reader, "tokenizer.ggml.tokens")

    def token(key: str) -> str | None:
        i = gguf_field(reader, key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    return Tokenizer(
        _byte_level_tokenizer(reader),
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
        chat_template=gguf_field(reader, "tokenizer.chat_template"),
        # llama.cpp adds no BOS to byte-level vocabularies unless the file says so.
        add_bos=bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(gguf_field(reader, "tokenizer.ggml.add_eos_token", False)),
        name=name,
    )
