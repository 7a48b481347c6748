"""One tokenizer interface over Hugging Face ``tokenizer.json`` files and SentencePiece models.

    Tokenizer
      ├─ _TokenizersBackend   wraps a ``tokenizers.Tokenizer`` (tokenizer.json, GGUF byte-level BPE)
      └─ _SentencePieceBackend wraps a ``SentencePieceProcessor`` (tokenizer.model: Llama 2, Gemma)

Both backends give the same ids as ``transformers.AutoTokenizer`` on the same files. On top of
them ``Tokenizer`` renders the model's own Jinja chat template exactly as transformers does, and
``tokenize_messages`` turns a conversation into ids plus a loss mask that is on only for what the
assistant writes. The mask is found from the template itself (character spans of the assistant
turns in the rendered text, mapped to tokens through offsets; see ``Tokenizer.assistant_spans``),
so one code path serves ChatML, Llama 2/3, Gemma, Qwen, Mistral and Phi templates, and a
template's own ``{% generation %}`` tags (transformers' convention) are honoured when it has them.
"""

from __future__ import annotations

import contextvars
import json
import os
import re
import warnings
from datetime import datetime
from typing import Any, Sequence

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Tokens that close a turn in the chat formats we know. Any of them present in the vocabulary
# becomes a stop id for generation (``Tokenizer.stop_ids``) next to the EOS token.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")

Message = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Backends: text <-> ids, with character offsets. No chat or BOS policy beyond what they are told.
# ---------------------------------------------------------------------------------------------
class _TokenizersBackend:
    """A ``tokenizers.Tokenizer``; BOS/EOS come from its post-processor."""

    def __init__(self, tok, add_bos: bool | None, add_eos: bool | None, bos: str | None, eos: str | None,
                 clean_up_spaces: bool = False) -> None:
        from tokenizers import processors

        self.tok = tok
        self.clean_up_spaces = clean_up_spaces
        # None keeps the tokenizer's own post-processor: transformers lets tokenizer.json decide
        # about BOS/EOS and drops tokenizer_config.json's add_bos_token/add_eos_token. Builders
        # that make the tokenizer themselves (GGUF) pass the file's flags explicitly.
        if add_bos is not None or add_eos is not None:
            add_bos = bool(add_bos) and bos is not None and tok.token_to_id(bos) is not None
            add_eos = bool(add_eos) and eos is not None and tok.token_to_id(eos) is not None
            single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
            pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
            specials = ([(bos, tok.token_to_id(bos))] if add_bos else []) + ([(eos, tok.token_to_id(eos))] if add_eos else [])
            tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        text = self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self.clean_up_spaces else text

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def special_ids(self) -> set[int]:
        return {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


class _SentencePieceBackend:
    """A ``SentencePieceProcessor``, with its control pieces (``<s>``, ``</s>``, …) matched as
    whole tokens in the text, the way transformers' converted Llama/Gemma tokenizers do.

    Needs the ``protobuf`` package: offsets come from SentencePiece's proto output.

    ``legacy`` follows transformers' flag of that name: when False (the default), text right after
    a special token gets no SentencePiece "dummy prefix" space; when True, every segment does.
    Text that already starts with a space gets none either (transformers' Metaspace rule, where
    SentencePiece itself would add one more).
    """

    def __init__(self, sp, add_bos: bool, add_eos: bool, legacy: bool = False, model_proto: bytes | None = None) -> None:
        self.sp, self.add_bos, self.add_eos, self.legacy = sp, add_bos, add_eos, legacy
        self._model_proto = model_proto
        self._no_prefix_sp = None  # built on first need, see _encode_segment
        self.specials = {
            sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)
        }
        pattern = "|".join(re.escape(p) for p in sorted(self.specials, key=len, reverse=True) if p)
        self._split = re.compile(f"({pattern})") if pattern else None
        self.adds_dummy_prefix = sp.encode("a", out_type=str)[0].startswith("\u2581")

    def _segments(self, text: str) -> list[tuple[int, str]]:
        """(char offset, piece of text) with special tokens as their own segments."""
        if self._split is None:
            return [(0, text)]
        out, pos = [], 0
        for part in self._split.split(text):
            if part:
                out.append((pos, part))
            pos += len(part)
        return out

    def _encode_segment(self, seg: str, first: bool) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and char offsets (within ``seg``) of one run of ordinary text."""
        # transformers (Metaspace) adds the prefix space only at the start of the text, or of every
        # segment when legacy, and never when the text already starts with a space.
        wants_prefix = (first or self.legacy) and not seg.startswith(" ")
        sp = self.sp if wants_prefix or not self.adds_dummy_prefix else self._without_dummy_prefix()
        proto = sp.encode(seg, return_type="proto")  # pieces with byte offsets (needs protobuf)
        # SentencePiece reports byte offsets into the input; convert them to character offsets.
        byte_to_char = [0] * (len(seg.encode("utf-8")) + 1)
        b = 0
        for ci, ch in enumerate(seg):
            n = len(ch.encode("utf-8"))
            for k in range(n):
                byte_to_char[b + k] = ci
            b += n
        byte_to_char[b] = len(seg)
        ids, offsets = [], []
        for p in proto.pieces:
            ids.append(p.id)
            start = byte_to_char[min(p.begin, b)]
            end = byte_to_char[min(p.end, b)] if p.end < b else len(seg)
            if p.end > p.begin and end == start:  # a byte-fallback piece inside one character
                end = start + 1
            offsets.append((start, end))
        return ids, offsets

    def _without_dummy_prefix(self):
        """The same model with ``add_dummy_prefix`` off (needs the protobuf package)."""
        if self._no_prefix_sp is None:
            import sentencepiece as spm

            try:
                from sentencepiece import sentencepiece_model_pb2
            except ImportError as e:  # protobuf missing
                raise ImportError(
                    "encoding text that follows a special token with a SentencePiece model needs the "
                    "'protobuf' package: pip install protobuf"
                ) from e
            m = sentencepiece_model_pb2.ModelProto()
            m.ParseFromString(self._model_proto or self.sp.serialized_model_proto())
            m.normalizer_spec.add_dummy_prefix = False
            self._no_prefix_sp = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
        return self._no_prefix_sp

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids, offsets = [], []
        for start, seg in self._segments(text):
            if seg in self.specials:
                ids.append(self.specials[seg])
                offsets.append((start, start + len(seg)))
                continue
            seg_ids, seg_offsets = self._encode_segment(seg, first=start == 0)
            ids += seg_ids
            offsets += [(start + a, start + b) for a, b in seg_offsets]
        return ids, offsets

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = self.encode_with_offsets(text)[0]
        if add_special_tokens:
            ids = ([self.sp.bos_id()] if self.add_bos and self.sp.bos_id() >= 0 else []) + ids
            ids = ids + ([self.sp.eos_id()] if self.add_eos and self.sp.eos_id() >= 0 else [])
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        specials = set(self.specials.values())
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i not in specials])
        # SentencePiece drops control pieces when decoding; write them back in between the runs.
        parts, run = [], []
        for i in ids:
            if i in specials:
                parts.append(self.sp.decode(run) if run else "")
                parts.append(self.sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        parts.append(self.sp.decode(run) if run else "")
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        # piece_to_id answers unk for unknown pieces; only the unk piece itself maps to unk.
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def special_ids(self) -> set[int]:
        return set(self.specials.values())

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()


def _clean_up_spaces(text: str) -> str:
    """transformers' ``clean_up_tokenization``: drop the space before punctuation and contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


# ---------------------------------------------------------------------------------------------
# Chat templates rendered exactly as transformers renders them.
# ---------------------------------------------------------------------------------------------
class TemplateError(ValueError):
    """A chat template raised (``raise_exception``), could not be parsed, or cannot be used."""


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used (missing files, unreadable config, no pad/eos token)."""


class TokenizerNotFoundError(TokenizerError, FileNotFoundError):
    """No tokenizer files where the source points."""


def _raise_exception(message: str):
    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # Templates that print tool schemas rely on transformers' tojson, which keeps unicode as is.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# While a conversation is rendered for its generation spans, {% generation %} blocks are wrapped in
# these two private-use characters (they never occur in real text; see Tokenizer._tagged_spans).
_GEN_OPEN, _GEN_CLOSE = "\U000f0001", "\U000f0002"
_mark_generation = contextvars.ContextVar("mark_generation", default=False)


class _GenerationTags(Extension):
    """``{% generation %} … {% endgeneration %}``: transformers' tag for what the assistant writes.

    Rendering is unchanged; while ``_mark_generation`` is set, each block's output is wrapped in
    ``_GEN_OPEN`` / ``_GEN_CLOSE`` so its character span can be read off the text.
    """

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_mark", []), [], [], body).set_lineno(lineno)

    def _mark(self, caller: Any) -> str:
        text = caller()
        return _GEN_OPEN + text + _GEN_CLOSE if _mark_generation.get() else text


_JINJA_ENV: ImmutableSandboxedEnvironment | None = None
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template with the environment transformers uses."""
    global _JINJA_ENV
    if _JINJA_ENV is None:
        _JINJA_ENV = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationTags]
        )
        _JINJA_ENV.filters["tojson"] = _tojson
        _JINJA_ENV.globals["raise_exception"] = _raise_exception
        _JINJA_ENV.globals["strftime_now"] = _strftime_now
    try:
        return _JINJA_ENV.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not parse (line {e.lineno}): {e.message}") from e


def has_generation_tags(source: str | None) -> bool:
    """Whether a template marks the assistant's text with ``{% generation %}`` tags."""
    return bool(source) and bool(_GENERATION_TAG.search(source))


def _sentinel(text: str, messages: list[Message]) -> str:
    """A private-use character that occurs neither in ``text`` nor in any message."""
    contents = "".join(str(m.get("content", "")) for m in messages)
    for code in range(0xE000, 0xE100):
        if chr(code) not in text and chr(code) not in contents:
            return chr(code)
    raise TemplateError("no free private-use character to locate messages with")  # 256 used: not real text


_warned_no_end_of_turn: set[str] = set()


def _warn_no_end_of_turn(name: str, stop_strings: list[str]) -> None:
    if name not in _warned_no_end_of_turn:
        _warned_no_end_of_turn.add(name)
        warnings.warn(f"the chat template of {name!r} closes an assistant turn with none of the stop tokens "
                      f"{stop_strings}, so no end-of-turn token is trained and the model cannot learn to stop; "
                      "choose a chat_template that ends turns with one (e.g. chatml)")


def _common_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def _common_suffix(a: str, b: str, limit: int) -> int:
    n = _common_prefix(a[::-1], b[::-1])
    return min(n, limit)


# ---------------------------------------------------------------------------------------------
# The public tokenizer.
# ---------------------------------------------------------------------------------------------
class Tokenizer:
    """Text ↔ token ids, chat templates and answer-only loss masks for one model.

    Build it with ``tunesmith.data.load_tokenizer`` (HF dir, Hub id, ``.gguf`` or ``.model``), or
    directly from a backend.

    Args:
        backend: A ``tokenizers.Tokenizer`` or a ``sentencepiece.SentencePieceProcessor``.
        bos_token: BOS token string, or None.
        eos_token: EOS token string, or None.
        pad_token: Padding token string; None falls back to EOS.
        chat_template: Jinja source of the model's chat template, or None.
        add_bos: Prepend BOS in ``encode``. For ``tokenizers`` backends None keeps the backend's
            own post-processor (tokenizer.json decides, as in transformers); for SentencePiece
            None means True.
        add_eos: Append EOS in ``encode`` (same None rule; False for SentencePiece).
        legacy: SentencePiece only, transformers' ``legacy`` flag (see ``_SentencePieceBackend``).
        clean_up_tokenization_spaces: transformers' flag of that name, applied in ``decode``.
        name: Where it came from, for messages.
    """

    def __init__(
        self,
        backend: Any,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
        legacy: bool = False,
        clean_up_tokenization_spaces: bool = False,
        name: str = "",
    ) -> None:
        import tokenizers

        if isinstance(backend, tokenizers.Tokenizer):
            self._backend = _TokenizersBackend(backend, add_bos, add_eos, bos_token, eos_token, clean_up_tokenization_spaces)
        else:  # a SentencePieceProcessor
            if bos_token is None and backend.bos_id() >= 0:
                bos_token = backend.id_to_piece(backend.bos_id())
            if eos_token is None and backend.eos_id() >= 0:
                eos_token = backend.id_to_piece(backend.eos_id())
            self._backend = _SentencePieceBackend(
                backend, add_bos=True if add_bos is None else add_bos, add_eos=bool(add_eos), legacy=legacy
            )
        self.name = name
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token if pad_token is not None else eos_token
        self.chat_template = chat_template
        self._template: jinja2.Template | None = None  # compiled lazily, recompiled if chat_template changes
        self._template_source: str | None = None

    # -- ids ---------------------------------------------------------------------------------
    def token_to_id(self, token: str | None) -> int | None:
        """Id of a token string, or None when it is not in the vocabulary."""
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        """Padding id: the pad token's, else EOS's (padding is masked out of the loss anyway)."""
        pad = self.token_to_id(self.pad_token)
        if pad is None:
            pad = self.eos_id
        if pad is None:
            raise TokenizerError(f"tokenizer {self.name!r} has neither a pad nor an eos token; add a pad_token to its "
                                 "tokenizer_config.json (or pass pad_token= to Tokenizer)")
        return pad

    @property
    def stop_ids(self) -> list[int]:
        """EOS plus every end-of-turn token in the vocabulary: generation stops at any of them."""
        ids = [self.eos_id] + [self.token_to_id(t) for t in END_OF_TURN_TOKENS]
        return list(dict.fromkeys(i for i in ids if i is not None))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._backend.vocab_size

    @property
    def backend(self) -> Any:
        """The ``tokenizers.Tokenizer`` or ``sentencepiece.SentencePieceProcessor`` underneath (what
        the exporters write out as tokenizer.json / GGUF metadata)."""
        return self._backend.tok if isinstance(self._backend, _TokenizersBackend) else self._backend.sp

    @property
    def special_ids(self) -> set[int]:
        """Ids of special (control) tokens: BOS, EOS, chat markers."""
        return self._backend.special_ids()

    # -- text --------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens``, BOS/EOS as this model's HF tokenizer adds them."""
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``, without special tokens unless ``skip_special_tokens=False``."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    # -- chat --------------------------------------------------------------------------------
    def render_chat(self, messages: list[Message], add_generation_prompt: bool = False, **kwargs: Any) -> str:
        """The conversation as text, through the model's own chat template.

        Args:
            messages: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``.
            add_generation_prompt: End with the header that opens an assistant turn.
            **kwargs: Extra template variables (e.g. ``tools``, ``date_string``).

        Raises:
            TemplateError: no template, or the template refuses the conversation or fails.
        """
        if self.chat_template is None:
            raise TemplateError(
                f"tokenizer {self.name!r} has no chat template; choose one with the chat_template option "
                "(chat_template=chatml, llama3, llama2, gemma or a Jinja file), or in Python set "
                "tokenizer.chat_template = tunesmith.data.chat_templates.get('chatml')"
            )
        if self._template is None or self._template_source != self.chat_template:
            self._template, self._template_source = compile_template(self.chat_template), self.chat_template
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                     "pad_token": self.pad_token or ""}
        variables.update(kwargs)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except TemplateError:
            raise
        except (jinja2.TemplateError, TypeError, KeyError, AttributeError) as e:  # the template's own code failed
            raise TemplateError(f"chat template of {self.name!r} failed on this conversation: {e}") from e

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = False, **kwargs: Any) -> list[int]:
        """Ids of ``render_chat(...)``, tokenized without adding BOS/EOS (the template writes them)."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **kwargs), add_special_tokens=False)

    def tokenize_messages(self, messages: list[Message], train_on: str = "assistant") -> tuple[list[int], list[bool]]:
        """Ids of a whole conversation and a loss mask over them.

        With ``train_on="assistant"`` the mask is True on every token that overlaps a span of
        ``assistant_spans`` (what the assistant writes, through the end-of-turn token that closes
        its turn, so the model learns to stop) and False on system/user turns and template
        markup. ``train_on="last_assistant"`` keeps only the final assistant turn (preference
        pairs: earlier answers are prompt). ``train_on="all"`` keeps every token.
        """
        if train_on not in ("assistant", "last_assistant", "all"):
            raise ValueError(f"train_on must be 'assistant', 'last_assistant' or 'all', got {train_on!r}")
        text = self.render_chat(messages)
        ids, offsets = self._backend.encode_with_offsets(text)
        if train_on == "all":
            return ids, [True] * len(ids)
        spans = self.assistant_spans(messages, text)
        if train_on == "last_assistant":
            spans = spans[-1:]
        mask = [any(s < e_tok and b_tok < e for s, e in spans) for b_tok, e_tok in offsets]
        return ids, mask

    def assistant_spans(self, messages: list[Message], text: str | None = None) -> list[tuple[int, int]]:
        """Character spans ``[start, end)`` in the rendered conversation of what the assistant writes.

        A template with ``{% generation %}`` tags says so itself (the spans are its tagged blocks,
        as in transformers' ``return_assistant_tokens_mask``). Otherwise, for each assistant message:

        * its content is located by rendering the conversation again with that content wrapped
          in a private-use character on both sides: the text differs exactly where the template
          put the content (trimmed or rewritten as it may be), never by searching for the text,
          which can also occur in another turn;
        * the span starts where generation starts: after the template's generation prompt
          (``messages[:i]`` rendered with ``add_generation_prompt``) when that is a prefix of the
          conversation — so an answer's reasoning block, which Qwen3 writes after the header, is
          trained on — and else at the content;
        * it ends with the first end-of-turn token (EOS, ``<|im_end|>``, ``<|eot_id|>``, …) after
          the content and before the next message. A template whose turns end in none gets a
          warning: the model could not learn to stop.

        Raises:
            TemplateError: an assistant message that cannot be located in the rendered text.
        """
        text = self.render_chat(messages) if text is None else text
        if has_generation_tags(self.chat_template):
            return self._tagged_spans(messages, text)
        regions = [self._content_region(messages, k, text) for k in range(len(messages))]
        stop_strings = [t for t in dict.fromkeys([self.eos_token, *END_OF_TURN_TOKENS])
                        if t and self.token_to_id(t) is not None]
        spans: list[tuple[int, int]] = []
        for k, msg in enumerate(messages):
            if msg.get("role") != "assistant":
                continue
            region = regions[k]
            others = [r for j, r in enumerate(regions) if j != k and r is not None]
            opening = self._opening(messages, k, text)
            anchor = region[0] if region is not None else opening  # the turn's content (or generation) start
            # the end of whatever the template rendered before this turn: generation cannot start earlier
            floor = max([e for _, e in spans] + [e for _, e in others if anchor is not None and e <= anchor], default=0)
            if opening is not None and floor <= opening and (region is None or opening <= region[0]):
                start = opening
            elif region is not None:
                start = region[0]
            else:
                raise TemplateError(f"cannot locate assistant message {k} in the conversation the chat template of "
                                    f"{self.name!r} renders (it rewrites or drops the content and its generation "
                                    "prompt is not a prefix of the conversation); use train_on=all or another "
                                    "chat_template")
            content_end = region[1] if region is not None else start
            ceiling = min([s for s, _ in others if s >= content_end], default=len(text))
            tail = text[content_end:ceiling]
            hits = [(tail.find(s), -len(s), s) for s in stop_strings if s in tail]
            if hits:
                pos, _, stop = min(hits)
                end = content_end + pos + len(stop)
            else:
                end = content_end
                _warn_no_end_of_turn(self.name, stop_strings)
            spans.append((start, end))
        return spans

    def _opening(self, messages: list[Message], k: int, text: str) -> int | None:
        """Where generation of message ``k`` starts: the length of ``messages[:k]`` rendered with the
        generation prompt, when that is a prefix of ``text``; else None."""
        try:
            opening = self.render_chat(messages[:k], add_generation_prompt=True)
        except TemplateError:
            return None
        return len(opening) if opening and text.startswith(opening) else None

    def _content_region(self, messages: list[Message], k: int, text: str) -> tuple[int, int] | None:
        """``[start, end)`` of message ``k``'s content as the template rendered it, or None when the
        template does not show it verbatim enough to tell (dropped, duplicated or split)."""
        content = messages[k].get("content")
        if not isinstance(content, str):
            return None
        mark = _sentinel(text, messages)
        probe = list(messages)
        probe[k] = {**messages[k], "content": mark + content + mark}
        try:
            out = self.render_chat(probe)
        except TemplateError:
            return None
        if out.count(mark) != 2:
            return None
        first, last = out.index(mark), out.rindex(mark)
        before = _common_prefix(text, out)
        after = _common_suffix(text, out, len(text) - before)
        if before != first or len(out) - 1 - after != last:
            return None  # the template changed text outside the content too: not a clean locate
        return before, len(text) - after

    def _tagged_spans(self, messages: list[Message], text: str) -> list[tuple[int, int]]:
        """Spans of the template's ``{% generation %}`` blocks in ``text``."""
        token = _mark_generation.set(True)
        try:
            marked = self.render_chat(messages)
        finally:
            _mark_generation.reset(token)
        spans, plain, start = [], [], 0
        for ch in marked:
            if ch == _GEN_OPEN:
                start = len(plain)
            elif ch == _GEN_CLOSE:
                spans.append((start, len(plain)))
            else:
                plain.append(ch)
        if "".join(plain) != text:
            raise TemplateError(f"chat template of {self.name!r} renders differently on a second pass "
                                "(does it depend on the time?); cannot read its generation tags")
        return [(s, e) for s, e in spans if e > s]

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, path: str) -> "Tokenizer":
        """Load a Hugging Face tokenizer directory: tokenizer.json preferred, else tokenizer.model."""
        config = _read_tokenizer_config(path)
        tokens = _special_tokens(path, config)
        json_path, model_path = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")
        common = dict(
            bos_token=tokens["bos_token"],
            eos_token=tokens["eos_token"],
            pad_token=tokens["pad_token"],
            chat_template=_chat_template(path, config),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            name=path,
        )
        if os.path.isfile(json_path):
            import tokenizers

            # BOS/EOS: tokenizer.json's post-processor decides, as in transformers.
            return cls(tokenizers.Tokenizer.from_file(json_path), **common)
        if os.path.isfile(model_path):
            return cls.from_sentencepiece(
                model_path, add_bos=config.get("add_bos_token", True), add_eos=config.get("add_eos_token", False),
                legacy=bool(config.get("legacy", False)), **common,
            )
        raise TokenizerNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in this directory")

    @classmethod
    def from_sentencepiece(cls, model_path: str, **kwargs: Any) -> "Tokenizer":
        """Load a SentencePiece ``.model`` file; keyword arguments as for ``Tokenizer``."""
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=model_path)
        kwargs.setdefault("name", model_path)
        kwargs.pop("clean_up_tokenization_spaces", None)  # SentencePiece decodes spacing itself
        return cls(sp, **kwargs)


def _read_tokenizer_config(path: str) -> dict[str, Any]:
    cfg_path = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(cfg_path):
        return {}
    with open(cfg_path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{cfg_path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    if not isinstance(config, dict):
        raise TokenizerError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
    return config


def _token_str(value: Any) -> str | None:
    """Special tokens are written as strings or as AddedToken dicts ({"content": ...})."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _special_tokens(path: str, config: dict[str, Any]) -> dict[str, str | None]:
    """bos/eos/pad token strings: tokenizer_config.json, else special_tokens_map.json."""
    out = {k: _token_str(config.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
    map_path = os.path.join(path, "special_tokens_map.json")
    if os.path.isfile(map_path):
        with open(map_path, encoding="utf-8") as f:
            special_map = json.load(f)
        for k in out:
            if out[k] is None:
                out[k] = _token_str(special_map.get(k))
    return out


def _chat_template(path: str, config: dict[str, Any]) -> str | None:
    """The default chat template: chat_template.jinja, or tokenizer_config.json's chat_template
    (a string, or a list of named templates of which we take "default")."""
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template
