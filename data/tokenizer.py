"""One tokenizer interface over Hugging Face ``tokenizer.json`` files and SentencePiece models.

    Tokenizer
      ├─ _TokenizersBackend   wraps a ``tokenizers.Tokenizer`` (tokenizer.json, GGUF byte-level BPE)
      └─ _SentencePieceBackend wraps a ``SentencePieceProcessor`` (tokenizer.model: Llama 2, Gemma)

Both backends give the same ids as ``transformers.AutoTokenizer`` on the same files. On top of
them ``Tokenizer`` renders the model's own Jinja chat template exactly as transformers does, and
``tokenize_messages`` turns a conversation into ids plus a loss mask that is on only for what the
assistant says. The mask is found from the template itself (character spans of the assistant
turns in the rendered text, mapped to tokens through offsets), so one code path serves ChatML,
Llama 2, Llama 3 and Gemma templates.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from typing import Any, Sequence

import jinja2
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
    """A chat template raised (``raise_exception``) or could not be parsed."""


def _raise_exception(message: str):
    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # Templates that print tool schemas rely on transformers' tojson, which keeps unicode as is.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


_JINJA_ENV: ImmutableSandboxedEnvironment | None = None


def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template with the environment transformers uses."""
    global _JINJA_ENV
    if _JINJA_ENV is None:
        _JINJA_ENV = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        _JINJA_ENV.filters["tojson"] = _tojson
        _JINJA_ENV.globals["raise_exception"] = _raise_exception
        _JINJA_ENV.globals["strftime_now"] = _strftime_now
    try:
        return _JINJA_ENV.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not parse (line {e.lineno}): {e.message}") from e


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
            raise ValueError(f"tokenizer {self.name!r} has neither a pad nor an eos token; pass pad_token=")
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
        """
        if self.chat_template is None:
            raise ValueError(
                f"tokenizer {self.name!r} has no chat template; set one from "
                "tunesmith.data.chat_templates (e.g. tokenizer.chat_template = chat_templates.get('chatml'))"
            )
        if self._template is None or self._template_source != self.chat_template:
            self._template, self._template_source = compile_template(self.chat_template), self.chat_template
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                     "pad_token": self.pad_token or ""}
        variables.update(kwargs)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = False, **kwargs: Any) -> list[int]:
        """Ids of ``render_chat(...)``, tokenized without adding BOS/EOS (the template writes them)."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **kwargs), add_special_tokens=False)

    def tokenize_messages(self, messages: list[Message], train_on: str = "assistant") -> tuple[list[int], list[bool]]:
        """Ids of a whole conversation and a loss mask over them.

        With ``train_on="assistant"`` the mask is True on the tokens of each assistant message's
        content plus the end-of-turn token that closes it (so the model learns to stop), and False
        on system/user turns and template markup. ``train_on="all"`` keeps every token.

        The assistant spans come from the template itself: rendering the conversation up to the
        opening of turn i (``add_generation_prompt=True``) tells where that turn's content starts
        in the full text; the content is found from there, and the span runs on to the first
        stop token before the next turn. Tokens overlapping a span (by character offsets) are on.
        """
        if train_on not in ("assistant", "all"):
            raise ValueError(f"train_on must be 'assistant' or 'all', got {train_on!r}")
        text = self.render_chat(messages)
        ids, offsets = self._backend.encode_with_offsets(text)
        if train_on == "all":
            return ids, [True] * len(ids)
        spans = self._assistant_spans(messages, text)
        mask = [any(s < e_tok and b_tok < e for s, e in spans) for b_tok, e_tok in offsets]
        return ids, mask

    def _assistant_spans(self, messages: list[Message], text: str) -> list[tuple[int, int]]:
        """Character spans [start, end) of assistant content (+ closing stop token) in ``text``."""
        stop_strings = [t for t in [self.eos_token, *END_OF_TURN_TOKENS] if t and self.token_to_id(t) is not None]
        spans, cursor = [], 0
        for i, msg in enumerate(messages):
            if msg.get("role") != "assistant":
                continue
            content = msg.get("content") or ""
            if not isinstance(content, str):
                raise ValueError(f"message {i}: assistant content must be a string, got {type(content).__name__}")
            opening = self.render_chat(messages[:i], add_generation_prompt=True)
            search_from = max(cursor, len(opening) if text.startswith(opening) else cursor)
            # Templates may trim the content (Llama 2, Gemma); look for it as written, then trimmed.
            start = text.find(content, search_from) if content else -1
            if start < 0 and content.strip():
                content = content.strip()
                start = text.find(content, search_from)
            if start < 0:
                start = search_from  # empty or rewritten content: nothing to anchor on but the header
                content = ""
            end = start + len(content)
            # The turn ends where the conversation rendered through this message ends.
            through = self.render_chat(messages[: i + 1])
            turn_end = len(through) if text.startswith(through) else len(text)
            tail = text[end:turn_end]
            hits = [(tail.find(s), s) for s in stop_strings if s in tail]
            if hits:
                pos, s = min(hits)
                end += pos + len(s)
            spans.append((start, end))
            cursor = end
        return spans

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
        raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in this directory")

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
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: invalid JSON at line {e.lineno}: {e.msg}") from e


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
