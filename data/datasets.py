"""Supervised fine-tuning data: read records, render them with the chat template, mask the loss.

    load_records("data/demo/train.jsonl")           → [{"instruction": ..., "input": ..., "output": ...}, ...]
    SFTDataset(records, tokenizer, format="instruct", max_seq_len=512)[i]
                                                    → {"tokens": [...], "labels": [...]}

Three record formats:

    instruct  {"instruction": str, "input": str (optional), "output": str}
              → user turn "instruction\\n\\ninput", assistant turn "output"
    chat      {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...]}
              or ShareGPT's {"conversations": [{"from": "human" | "gpt" | "system" | ..., "value": str}, ...]}
    text      {"text": str}: plain text for continued pre-training; every token is a target, and a
              text longer than max_seq_len is split into pieces (overlapping by one token, so every
              token is still predicted once) instead of being truncated

Labels are already shifted: ``labels[t]`` is the target for position t, i.e. ``tokens[t + 1]``
where that token is in the loss (assistant content, see ``Tokenizer.tokenize_messages``) and
``-100`` elsewhere. So the loss is a plain ``cross_entropy(logits[b, t], labels[b, t])`` with no
further shifting, and packing needs no fix-ups at example boundaries.

Errors name the file and line (``.jsonl``) or record index (``.json``) and the field at fault.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import warnings
from typing import Any

from torch.utils.data import Dataset

from tunesmith.data.collate import IGNORE_INDEX
from tunesmith.data.tokenizer import TemplateError, Tokenizer

FORMATS = ("instruct", "chat", "text")
FORMAT_FIELDS = {"instruct": ("instruction", "input", "output"), "chat": ("messages",), "text": ("text",)}
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speakers (the "from" of each turn) → our roles.
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "model": "assistant", "function_call": "assistant",  # a tool call is something the model writes
    "system": "system",
    "tool": "tool", "function": "tool", "observation": "tool", "function_response": "tool",
}


class DataError(ValueError):
    """Bad training data: the message names the file, the line or record, and the field."""


class Records(list):
    """A list of record dicts that remembers where each came from (for error messages).

    ``locations[i]`` reads like ``"train.jsonl line 12"`` or ``"data.json record 3"``.
    """

    def __init__(self, records: list[dict] = (), locations: list[str] | None = None) -> None:
        super().__init__(records)
        self.locations = list(locations) if locations is not None else [f"record {i}" for i in range(len(self))]


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def _open_text(path: str):
    """Open a data file as text; ``.gz`` files (Anthropic HH ships ``train.jsonl.gz``) are decompressed."""
    if path.endswith(".gz"):
        import gzip

        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_jsonl(path: str) -> Records:
    records, where = [], []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(obj).__name__}")
            records.append(obj)
            where.append(f"{path} line {lineno}")
    return Records(records, where)


def _read_json(path: str) -> Records:
    with _open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__} "
                        "(use .jsonl for one object per line)")
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise DataError(f"{path} record {i}: expected a JSON object, got {type(obj).__name__}")
    return Records(data, [f"{path} record {i}" for i in range(len(data))])


def _read_parquet(path: str) -> Records:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), "
                        "or convert the data to .jsonl") from None
    rows = pq.read_table(path).to_pylist()
    return Records(rows, [f"{path} row {i}" for i in range(len(rows))])


def _read_file(path: str) -> Records:
    if path.endswith((".jsonl", ".jsonl.gz")):
        return _read_jsonl(path)
    if path.endswith((".json", ".json.gz")):
        return _read_json(path)
    if path.endswith(".parquet"):
        return _read_parquet(path)
    raise DataError(f"{path}: unsupported data file type (use .json, .jsonl (optionally .gz) or .parquet)")


_SPLIT_WORDS = {"train", "validation", "valid", "val", "test", "dev", "eval"}
DATA_FILE_TYPES = ("json", "jsonl", "json.gz", "jsonl.gz", "parquet")


def _split_files(root: str, split: str) -> list[str]:
    """Data files of ``split`` in a dataset folder laid out like a Hub dataset repo.

    A file belongs to the split when its path has the split's name as a word (split on / - .):
    ``train.jsonl``, ``data/train-00000-of-00002.parquet``, ``train/part1.json``,
    ``data/train_prefs-00000-of-00001.parquet`` (split ``train_prefs``). A folder whose files name no
    split at all is taken to be one "train" split.
    """
    files = sorted(
        f for ext in DATA_FILE_TYPES
        for f in glob.glob(os.path.join(root, "**", f"*.{ext}"), recursive=True)
    )
    words = {f: re.split(r"[/\\.\-]", os.path.relpath(f, root).lower()) for f in files}
    chosen = [f for f in files if split.lower() in words[f]]
    names_a_split = any(_SPLIT_WORDS & set(re.split(r"[/\\_.\-]", os.path.relpath(f, root).lower())) for f in files)
    if not chosen and split == "train" and not names_a_split:
        chosen = files
    if not chosen:
        names = [os.path.relpath(f, root) for f in files] or "none"
        raise DataError(f"{root}: no data files for split {split!r} (files found: {names})")
    return chosen


def load_records(source: str, split: str = "train") -> Records:
    """Read raw records from a local file, a local dataset folder, or a Hub dataset repo id.

    Args:
        source: ``.json`` (a list of objects), ``.jsonl`` (one object per line), ``.parquet``,
            a folder laid out like a Hub dataset repo, or a Hub id such as ``"owner/name"``
            (downloaded with ``snapshot_download(repo_type="dataset")``, data files only).
        split: Which split to read from a folder / Hub repo (``train.jsonl``,
            ``data/train-*.parquet``, ...). Ignored for a single file.

    Returns:
        ``Records``: the dicts, with their file/line locations for error messages.
    """
    source = os.fspath(source)
    if os.path.isfile(source):
        return _read_file(source)
    if os.path.isdir(source):
        root = source
    elif source.count("/") == 1 and not source.startswith((".", "/", "~")) and not os.path.splitext(source)[1]:
        from huggingface_hub import snapshot_download

        root = snapshot_download(repo_id=source, repo_type="dataset",
                                 allow_patterns=[f"*.{ext}" for ext in DATA_FILE_TYPES])
    else:
        raise DataError(f"data source {source!r} not found: give a .json/.jsonl/.parquet file, "
                        "a dataset folder, or a Hub dataset id 'owner/name'")
    out = Records()
    for path in _split_files(root, split):
        part = _read_file(path)
        out.extend(part)
        out.locations.extend(part.locations)
    return out


def split_records(records: list[dict], val_fraction: float, seed: int = 0) -> tuple[Records, Records]:
    """Shuffle and hold out ``val_fraction`` of the records, for sources without a validation split.

    Returns:
        ``(train, val)``; at least one record goes to val when ``val_fraction > 0``.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not records:
        raise DataError("no records to split into training and held-out examples")
    locations = getattr(records, "locations", [f"record {i}" for i in range(len(records))])
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(records) * val_fraction)) if val_fraction > 0 else 0
    if n_val >= len(records):
        raise DataError(f"holding out val_fraction={val_fraction} of {len(records)} record(s) leaves none to train on; "
                        "lower data.val_fraction or give a held-out file with data.val")
    pick = lambda idx: Records([records[i] for i in idx], [locations[i] for i in idx])  # noqa: E731
    return pick(sorted(order[n_val:])), pick(sorted(order[:n_val]))


# ---------------------------------------------------------------------------------------------
# Records → conversations → tokens and labels
# ---------------------------------------------------------------------------------------------
def _guess_format(record: dict) -> str | None:
    """Which format a record looks like, for a hint when it does not fit the configured one."""
    if "messages" in record or "conversations" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "instruct"
    if "text" in record:
        return "text"
    return None


def _field(record: dict, name: str, where: str, *, required: bool = True, format: str | None = None) -> Any:
    if name not in record or (required and record[name] is None):
        if not required:
            return None
        guess = _guess_format(record) if format is not None else None
        hint = (f"; the record looks like format={guess} data: set data.format={guess}"
                if guess is not None and guess != format else
                f"; if it has another name, map it: data.column_map.{name}=your_name "
                f"(in Python: column_map={{{name!r}: 'your_name'}})")
        raise DataError(f"{where}: missing field {name!r} (fields present: {sorted(record)}){hint}")
    return record[name]


def _string(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _columns(column_map: dict[str, str] | None) -> dict[str, str]:
    cols = {name: name for fields in FORMAT_FIELDS.values() for name in fields}
    cols.update(column_map or {})
    return cols


def _message(m: Any, at: str) -> dict[str, str]:
    """One turn, OpenAI style (``role``/``content``) or ShareGPT style (``from``/``value``)."""
    if not isinstance(m, dict):
        raise DataError(f"{at} must be an object with 'role' and 'content' (or ShareGPT 'from' and 'value'), "
                        f"got {type(m).__name__}")
    if "from" in m and "role" not in m:
        speaker = _string(_field(m, "from", at), "from", at)
        role = SHAREGPT_ROLES.get(speaker.lower())
        if role is None:
            raise DataError(f"{at} has from={speaker!r}; expected one of {', '.join(SHAREGPT_ROLES)}")
        return {"role": role, "content": _string(_field(m, "value", at), "value", at)}
    if "role" not in m and "content" not in m:
        raise DataError(f"{at} has neither 'role'/'content' (OpenAI style) nor 'from'/'value' (ShareGPT) "
                        f"(keys present: {sorted(m)})")
    role = _string(_field(m, "role", at), "role", at)
    if role not in ROLES:
        raise DataError(f"{at} has role {role!r}; expected one of {ROLES}")
    return {"role": role, "content": _string(_field(m, "content", at), "content", at)}


def record_to_messages(record: dict, format: str, where: str, column_map: dict[str, str] | None = None) -> list[dict]:
    """One ``instruct`` or ``chat`` record as a chat conversation, validating its fields.

    Args:
        record: The raw dict.
        format: ``"instruct"`` or ``"chat"``.
        where: Its location, e.g. ``"train.jsonl line 3"``, for error messages.
        column_map: Our field name → the record's (``{"output": "response"}``).
    """
    cols = _columns(column_map)
    if format == "instruct":
        instruction = _string(_field(record, cols["instruction"], where, format=format), cols["instruction"], where)
        extra = _field(record, cols["input"], where, required=False)
        extra = "" if extra is None else _string(extra, cols["input"], where)
        output = _string(_field(record, cols["output"], where, format=format), cols["output"], where)
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    if format == "chat":
        name = cols["messages"]
        if name == "messages" and name not in record and "conversations" in record:
            name = "conversations"  # ShareGPT
        messages = _field(record, name, where, format=format)
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field {name!r} must be a non-empty list of "
                            f"{{'role', 'content'}} objects, got {type(messages).__name__}")
        out = [_message(m, f"{where}: {name}[{j}]") for j, m in enumerate(messages)]
        if not any(m["role"] == "assistant" for m in out):
            raise DataError(f"{where}: {name} has no assistant message, so there is nothing to learn")
        return out
    raise ValueError(f"format must be one of {FORMATS[:2]}, got {format!r}")


def shifted_labels(tokens: list[int], mask: list[bool]) -> list[int]:
    """``labels[t] = tokens[t + 1]`` where ``mask[t + 1]``, else -100; the last label is -100."""
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(tokens[1:], mask[1:])]
    return labels + [IGNORE_INDEX]


def text_pieces(ids: list[int], max_seq_len: int) -> list[list[int]]:
    """A long token sequence as pieces of at most ``max_seq_len`` that overlap by one token, so
    every token but the first is the target of exactly one position (``[a b c d e]``, 3 →
    ``[a b c] [c d e]``)."""
    if len(ids) <= max_seq_len:
        return [ids]
    stride = max_seq_len - 1
    return [ids[s:s + max_seq_len] for s in range(0, len(ids) - 1, stride)]


class SFTDataset(Dataset):
    """Tokenized supervised fine-tuning examples, built eagerly so bad data fails at startup.

    Args:
        records: Dicts from ``load_records`` (or any list of dicts).
        tokenizer: Renders each conversation with the model's chat template.
        format: ``"instruct"``, ``"chat"`` or ``"text"``.
        max_seq_len: Examples are truncated to this many tokens (texts are split, see ``text_pieces``).
        train_on: ``"assistant"`` (loss on answers only) or ``"all"`` (instruct / chat).
        column_map: Our field names → the records' (``{"output": "response"}``).
        source_name: Where the records came from, for messages when they carry no locations.

    Items are ``{"tokens": list[int], "labels": list[int]}`` of equal length, labels shifted.
    Examples left with no label after truncation are dropped (with a warning): they would add
    nothing to the loss.

    Raises:
        DataError: a record that does not fit the format (naming file, line and field), a
            ``column_map`` name no record has, a conversation the chat template refuses, or no
            usable example at all.
    """

    def __init__(
        self,
        records: list[dict],
        tokenizer: Tokenizer,
        *,
        format: str = "instruct",
        max_seq_len: int = 2048,
        train_on: str = "assistant",
        column_map: dict[str, str] | None = None,
        source_name: str = "data",
    ) -> None:
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        if not records:
            raise DataError(f"{source_name} holds no records (the file is empty or has only blank lines)")
        locations = getattr(records, "locations", None) or [f"{source_name} record {i}" for i in range(len(records))]
        cols = _columns(column_map)
        self.items: list[dict] = []
        self.conversations: list[list[dict]] = []  # the rendered messages, for sample prompts
        self.records: list[dict] = []  # the raw record of each kept example (fields for eval metrics)
        self.num_truncated = 0  # examples cut at max_seq_len (texts: split into pieces)
        dropped = 0
        mapped_seen = {theirs: False for theirs in (column_map or {}).values()}
        for record, where in zip(records, locations):
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected an object, got {type(record).__name__}")
            for theirs in mapped_seen:
                mapped_seen[theirs] = mapped_seen[theirs] or theirs in record
            if format == "text":
                pieces = self._text(record, where, cols["text"], tokenizer, max_seq_len)
                self.num_truncated += len(pieces) > 1
                self.items += [{"tokens": p, "labels": shifted_labels(p, [True] * len(p))} for p in pieces]
                self.conversations += [[] for _ in pieces]
                self.records += [record for _ in pieces]
                dropped += not pieces
                continue
            messages = record_to_messages(record, format, where, column_map)
            try:
                tokens, mask = tokenizer.tokenize_messages(messages, train_on=train_on)
            except TemplateError as e:
                raise DataError(f"{where}: the chat template cannot render this conversation: {e}") from None
            if len(tokens) > max_seq_len:
                tokens, mask = tokens[:max_seq_len], mask[:max_seq_len]
                self.num_truncated += 1
            labels = shifted_labels(tokens, mask)
            if all(label == IGNORE_INDEX for label in labels):
                dropped += 1
                continue
            self.items.append({"tokens": tokens, "labels": labels})
            self.conversations.append(messages)
            self.records.append(record)
        unseen = [(ours, theirs) for ours, theirs in (column_map or {}).items() if not mapped_seen[theirs]]
        if unseen and records:
            ours, theirs = unseen[0]
            first = records[0] if isinstance(records[0], dict) else {}
            raise DataError(f"{source_name}: data.column_map.{ours}={theirs!r}, but no record has a field {theirs!r} "
                            f"(fields of {locations[0]}: {sorted(first)})")
        if dropped:
            reason = "empty texts" if format == "text" else f"no assistant tokens within max_seq_len={max_seq_len}"
            warnings.warn(f"{source_name}: dropped {dropped} example(s) with {reason}"
                          + ("" if format == "text" else "; raise max_seq_len to keep them"))
        if not self.items:
            raise DataError(f"{source_name}: no usable examples ({len(records)} records read)")

    @staticmethod
    def _text(record: dict, where: str, name: str, tokenizer: Tokenizer, max_seq_len: int) -> list[list[int]]:
        text = _string(_field(record, name, where, format="text"), name, where)
        if not text.strip():
            return []
        ids = tokenizer.encode(text, add_special_tokens=True)
        eos = tokenizer.eos_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)  # documents end in EOS, so the model learns where a text stops
        return text_pieces(ids, max_seq_len)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    def prompt_messages(self, i: int) -> list[dict]:
        """Example ``i``'s conversation up to (not including) its last assistant turn: a prompt to
        sample (empty for plain text, which has no prompt)."""
        messages = self.conversations[i]
        last = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        return messages[:last]

    def reference(self, i: int) -> str:
        """Example ``i``'s target answer: its last assistant turn (what eval metrics compare against)."""
        return [m for m in self.conversations[i] if m["role"] == "assistant"][-1]["content"]
