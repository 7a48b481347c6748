"""SentencePiece-style GGUF vocabularies (``tokenizer.ggml.model == "llama"``) as a ``Tokenizer``.

Gemma (and Llama 2) ship a SentencePiece BPE model. llama.cpp's GGUF keeps its pieces
(``tokenizer.ggml.tokens``), their scores and types, but no merge list: SentencePiece BPE merges the
adjacent pair whose *result* scores best, so the merges are implied by the vocabulary. We rebuild
them and hand everything to a ``tokenizers`` BPE with byte fallback, the same construction
``transformers`` uses for these files (so ids match its ``AutoTokenizer(..., gguf_file=...)``):

* every way of cutting a piece into two pieces of the vocabulary is a merge, ranked by the piece's
  score — for Gemma by its position in the file instead, which is the order Gemma's BPE learned
  them in (its scores are the negated position, but with ties);
* pieces the file types as control (3: ``<bos>``, ``<start_of_turn>``…) become special tokens, and
  user-defined ones (4: Gemma's ``\\n`` runs, HTML tags) plain added tokens, both matched whole;
* Gemma writes a space as "▁" everywhere (normaliser, no prefix space) and stores its pieces made
  only of spaces with real spaces ("  "), which we respell as "▁▁" so they are reachable;
  Llama 2 instead prefixes the first word with "▁" (``Metaspace``) and strips it on decode, and
  Phi-3 prefixes the whole text with it (a normaliser, as its tokenizer.json does).
"""

from __future__ import annotations

from typing import Any

from tunesmith.data.tokenizer import Tokenizer

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
SPACE = "\u2581"  # SentencePiece's visible space, "▁"
GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def bpe_merges(tokens: list[str], priority: list[float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies, best first.

    Args:
        tokens: The pieces, in id order.
        priority: One number per piece; higher merges earlier (the score, or minus the position).

    Returns:
        ``(left, right)`` pairs: every split of a piece into two pieces that are themselves in the
        vocabulary, ordered by the piece's priority and, within one piece, longer left part first.
    """
    vocab = set(tokens)
    ranked = []
    for token, prio in zip(tokens, priority):
        for cut in range(len(token) - 1, 0, -1):  # longest left part first
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-prio, len(ranked), left, right))
    ranked.sort()  # by priority, then (stable) by the order found above
    return [(left, right) for _, _, left, right in ranked]


def tokenizer_from_gguf_spm(reader: Any) -> Tokenizer:
    """Build the ``Tokenizer`` of a GGUF file with a SentencePiece-style vocabulary.

    Args:
        reader: An open ``gguf.GGUFReader`` whose ``tokenizer.ggml.model`` is ``"llama"``.

    Returns:
        A ``Tokenizer`` (``tokenizers`` backend) with the file's special tokens, BOS/EOS policy
        and chat template (when it has one).

    Raises:
        ValueError: the file lacks ``tokenizer.ggml.tokens`` or is not a SentencePiece vocabulary.
    """
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "llama":
        raise ValueError(f"GGUF tokenizer.ggml.model={kind!r}: not a SentencePiece-style vocabulary ('llama')")
    tokens: list[str] | None = _field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError("GGUF file has no tokenizer.ggml.tokens; it carries no tokenizer")
    types: list[int] = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    arch = _field(reader, "general.architecture")
    is_gemma = arch in GEMMA_ARCHITECTURES

    respelled: set[int] = set()
    if is_gemma:
        respelled = {i for i, t in enumerate(tokens) if " " in t and not t.strip()}
        tokens = [SPACE * len(t) if i in respelled else t for i, t in enumerate(tokens)]
        priority = [-i for i in range(len(tokens))]
    else:
        priority = list(_field(reader, "tokenizer.ggml.scores") or [-i for i in range(len(tokens))])

    def token(key: str) -> str | None:
        i = _field(reader, key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    unk = token("tokenizer.ggml.unknown_token_id")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = bpe_merges(tokens, priority)
    tok = HFTokenizer(models.BPE(vocab, merges, unk_token=unk if is_gemma else None, fuse_unk=True, byte_fallback=True))
    decode_steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if is_gemma:
        tok.normalizer = normalizers.Replace(" ", SPACE)
        # Gemma's own splitter: cut after each space. After the normaliser there are none left, so
        # a run of text between added tokens reaches BPE whole, as in SentencePiece.
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:
        add_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
        if arch == "phi3" and add_prefix:
            # Phi-3's tokenizer.json (and llama.cpp) prepend "▁" even to text that starts with a space,
            # where Metaspace would not: "  hi" is "▁▁▁hi".
            tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(
                replacement=SPACE, prepend_scheme="first" if add_prefix else "never", split=False
            )
        if add_prefix:
            decode_steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(decode_steps)
    tok.add_special_tokens([
        AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_TYPE_CONTROL
    ])
    # (The respelled space runs stay ordinary BPE pieces: the normaliser already turned spaces into "▁".)
    tok.add_tokens([
        AddedToken(t, special=False, normalized=False)
        for i, (t, k) in enumerate(zip(tokens, types)) if k == TOKEN_TYPE_USER_DEFINED and i not in respelled
    ])

    return Tokenizer(
        tok,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"),
        # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", True)),
        add_eos=bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        name=f"GGUF vocabulary ({arch})",
    )
