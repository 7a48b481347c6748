"""Preference data: (prompt, chosen, rejected) records → tokenized pairs with response-only labels.

    load_records("data/demo/preference_train.jsonl")
    PreferenceDataset(records, tokenizer, max_seq_len=512)[i]
        → {"chosen_tokens", "chosen_labels", "rejected_tokens", "rejected_labels", "index"}

Three record layouts are read, told apart per record:

    plain       {"prompt": str, "chosen": str, "rejected": str}
    chat        {"prompt": str | [messages], "chosen": [messages], "rejected": [messages]}
                (binarized UltraFeedback: chosen/rejected are the whole conversation ending in the
                assistant answer; the prompt is what comes before that answer)
    transcript  {"chosen": "\\n\\nHuman: … \\n\\nAssistant: …", "rejected": "…"}   (Anthropic HH)
                both transcripts share everything up to the final "Assistant:" turn

Both sides are rendered with the model's chat template. Labels are shifted as in ``SFTDataset``
(``labels[t]`` is the target for position t) and are on only for the FINAL assistant turn: earlier
assistant turns belong to the prompt, and the preference is about the last answer only. The final
turn is found on the whole conversation before it is cut to ``max_seq_len``, so a label can never
land on an earlier turn. A pair is dropped (and counted in a warning at startup) when its final
answer starts beyond ``max_seq_len`` on either side, or when chosen and rejected are identical
within ``max_seq_len`` (such a pair has zero gradient: it trains nothing); an answer that starts
within ``max_seq_len`` but runs past it is cut at the end, as in other DPO implementations.

In the chat layout the conversation before the answer comes from ``chosen``/``rejected`` when they
carry one (UltraFeedback repeats the prompt there), else from ``prompt``; chosen and rejected
must then share it exactly.

Errors name the file and line (or record) and the field at fault.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch.utils.data import Dataset

from tunesmith.data.collate import IGNORE_INDEX, pad_collate
from tunesmith.data.datasets import ROLES, DataError, shifted_labels
from tunesmith.data.tokenizer import TemplateError, Tokenizer

Messages = list[dict[str, str]]

# "\n\nHuman: " / "\n\nAssistant: " turn markers of the Anthropic HH transcripts.
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _messages(value: Any, field: str, where: str) -> Messages:
    """Validate a list of {"role", "content"} dicts."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {field!r} must be a string or a non-empty list of "
                        f"{{'role', 'content'}} messages, got {type(value).__name__}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {field}[{j}] must be an object with string 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {field}[{j}] has role {m['role']!r}; expected one of {ROLES}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def parse_transcript(text: str, field: str, where: str) -> Messages:
    """An Anthropic HH transcript ("\\n\\nHuman: hi\\n\\nAssistant: hello") as chat messages."""
    parts = _HH_TURN.split(text)  # [preamble, role, content, role, content, ...]
    if len(parts) < 3 or parts[0].strip():
        raise DataError(f"{where}: field {field!r} is not a '\\n\\nHuman: … \\n\\nAssistant: …' transcript "
                        "(and the record has no 'prompt' field)")
    return [{"role": _HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def _split_last_answer(conversation: Messages, field: str, where: str) -> tuple[Messages, str]:
    """(everything before the final assistant message, that message's content)."""
    if conversation[-1]["role"] != "assistant":
        raise DataError(f"{where}: field {field!r} must end with an assistant message (the answer being judged), "
                        f"it ends with a {conversation[-1]['role']!r} message")
    return conversation[:-1], conversation[-1]["content"]


def record_to_pair(record: dict, where: str) -> tuple[Messages, str, str]:
    """One preference record as ``(prompt messages, chosen answer, rejected answer)``.

    Args:
        record: A raw dict in one of the layouts of this module's docstring.
        where: Its location (``"train.jsonl line 3"``) for error messages.

    Raises:
        DataError: naming ``where`` and the missing or malformed field.
    """
    for name in ("chosen", "rejected"):
        if record.get(name) is None:
            raise DataError(f"{where}: missing field {name!r} (fields present: {sorted(record)}); a preference "
                            "record needs 'prompt', 'chosen' and 'rejected' (or HH-style 'chosen'/'rejected' transcripts)")
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")

    if prompt is None:  # only Anthropic HH transcripts carry their prompt inside chosen/rejected
        if not isinstance(chosen, str):
            raise DataError(f"{where}: missing field 'prompt' (fields present: {sorted(record)})")
        if not isinstance(rejected, str):
            raise DataError(f"{where}: field 'rejected' must be a transcript string like 'chosen', got {type(rejected).__name__}")
        chosen_conv, rejected_conv = parse_transcript(chosen, "chosen", where), parse_transcript(rejected, "rejected", where)
        prompt_messages, chosen_answer = _split_last_answer(chosen_conv, "chosen", where)
        rejected_prefix, rejected_answer = _split_last_answer(rejected_conv, "rejected", where)
        if rejected_prefix != prompt_messages:
            raise DataError(f"{where}: 'chosen' and 'rejected' transcripts differ before their final Assistant turn; "
                            "a preference pair must answer the same conversation")
        return prompt_messages, chosen_answer, rejected_answer

    if isinstance(prompt, str):
        prompt_messages = [{"role": "user", "content": prompt}]
    else:
        prompt_messages = _messages(prompt, "prompt", where)
    answers, prefixes = [], {}
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(value, str):
            answers.append(value)
            continue
        conversation = _messages(value, name, where)
        prefix, answer = _split_last_answer(conversation, name, where)
        if prefix:  # UltraFeedback repeats the prompt inside chosen/rejected; a bare [assistant] list does not
            prefixes[name] = prefix
        answers.append(answer)
    if len(prefixes) == 2 and prefixes["chosen"] != prefixes["rejected"]:
        a, b = prefixes["chosen"], prefixes["rejected"]
        j = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise DataError(f"{where}: 'chosen' and 'rejected' answer different conversations (they differ at message "
                        f"{j} before the final answer); a preference pair must answer the same prompt")
    prompt_messages = prefixes.get("chosen") or prefixes.get("rejected") or prompt_messages
    if not prompt_messages or prompt_messages[-1]["role"] == "assistant":
        raise DataError(f"{where}: field 'prompt' must end with a user (or system/tool) message, not an answer")
    return prompt_messages, answers[0], answers[1]


def _side(tokenizer: Tokenizer, prompt: Messages, answer: str, max_seq_len: int,
          where: str) -> tuple[list[int], list[int], bool]:
    """(tokens, shifted labels on the final answer only, whether it was cut) of one side, cut to ``max_seq_len``."""
    try:
        tokens, mask = tokenizer.tokenize_messages(prompt + [{"role": "assistant", "content": answer}],
                                                   train_on="last_assistant")
    except TemplateError as e:
        raise DataError(f"{where}: the chat template cannot render this pair: {e}") from None
    labels = shifted_labels(tokens, mask)  # on the whole conversation, so the final turn is the final turn
    if len(tokens) <= max_seq_len:
        return tokens, labels, False
    return tokens[:max_seq_len], labels[:max_seq_len - 1] + [IGNORE_INDEX], True  # the last target was cut off


class PreferenceDataset(Dataset):
    """Tokenized preference pairs, built eagerly so bad data fails at startup.

    Args:
        records: Dicts from ``load_records`` (their ``locations`` name file and line in errors).
        tokenizer: Renders prompt + answer with the model's chat template.
        max_seq_len: Each side is cut to this many tokens; pairs whose answer starts beyond it, or
            that are identical within it, are dropped (counted in one warning).
        source_name: Names the data in messages when the records carry no locations.

    Items: ``{"chosen_tokens", "chosen_labels", "rejected_tokens", "rejected_labels": list[int],
    "index": int}``; ``index`` is the pair's position in the dataset (precomputed reference
    log-probs are looked up by it). ``num_truncated`` / ``num_dropped`` count what was cut / left out.
    """

    def __init__(self, records: list[dict], tokenizer: Tokenizer, *, max_seq_len: int = 1024,
                 source_name: str = "data") -> None:
        if not records:
            raise DataError(f"{source_name} holds no records (the file is empty or has only blank lines)")
        locations = getattr(records, "locations", None) or [f"{source_name} record {i}" for i in range(len(records))]
        self.items: list[dict] = []
        self.prompts: list[Messages] = []
        self.chosen: list[str] = []  # the preferred answer of each kept pair (the eval metrics' reference)
        self.records: list[dict] = []  # the raw record of each kept pair (fields for eval metrics)
        self.num_truncated = 0
        beyond, identical = 0, 0
        for record, where in zip(records, locations):
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected an object, got {type(record).__name__}")
            prompt, chosen, rejected = record_to_pair(record, where)
            item: dict[str, Any] = {}
            cut = False
            for side, answer in (("chosen", chosen), ("rejected", rejected)):
                tokens, labels, was_cut = _side(tokenizer, prompt, answer, max_seq_len, where)
                item[f"{side}_tokens"], item[f"{side}_labels"] = tokens, labels
                cut = cut or was_cut
            if all(y == IGNORE_INDEX for y in item["chosen_labels"]) or all(y == IGNORE_INDEX for y in item["rejected_labels"]):
                beyond += 1
                continue
            if item["chosen_tokens"] == item["rejected_tokens"]:
                identical += 1
                continue
            self.num_truncated += cut
            item["index"] = len(self.items)
            self.items.append(item)
            self.prompts.append(prompt)
            self.chosen.append(chosen)
            self.records.append(record)
        self.num_dropped = beyond + identical
        if self.num_dropped:
            reasons = []
            if beyond:
                reasons.append(f"{beyond} whose final answer starts beyond max_seq_len={max_seq_len} (raise it to keep them)")
            if identical:
                reasons.append(f"{identical} whose chosen and rejected are identical within max_seq_len (they train nothing)")
            warnings.warn(f"{source_name}: dropped {self.num_dropped} pair(s) of {len(records)}: " + "; ".join(reasons))
        if self.num_truncated:
            warnings.warn(f"{source_name}: {self.num_truncated} pair(s) have an answer cut at max_seq_len={max_seq_len}")
        if not self.items:
            raise DataError(f"{source_name}: no usable preference pairs ({len(records)} records read)")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    def prompt_messages(self, i: int) -> Messages:
        """Pair ``i``'s prompt (for a sample answer)."""
        return self.prompts[i]

    def reference(self, i: int) -> str:
        """Pair ``i``'s chosen answer (what eval metrics compare against)."""
        return self.chosen[i]


def preference_collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack b pairs into ONE right-padded batch of 2b rows: chosen first, then rejected.

    One batch means one forward pass for both sides (the weights are read once per step).

    Returns:
        ``{"tokens": [2b, s], "labels": [2b, s], "lengths": [2b], "index": [b]}``; rows ``:b`` are
        the chosen responses, rows ``b:`` the rejected ones, in the same pair order.
    """
    rows = [{"tokens": it[f"{side}_tokens"], "labels": it[f"{side}_labels"]}
            for side in ("chosen", "rejected") for it in items]
    batch = pad_collate(rows, pad_id)
    batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
    return batch


def pack_pairs(items: list[dict], row_len: int) -> list[dict]:
    """Greedily pack whole pairs, both sides, into rows of at most ``row_len`` tokens.

    A row is ``[chosen₀ rejected₀ chosen₁ rejected₁ …]``: positions restart for every response
    and ``document_ids`` give chosen of slot k the id 2k and rejected 2k + 1, so attention stays
    inside each response and the log-probs are summed per document. A pair never spans two rows,
    so a row holds every pair it starts (the unit a process takes under FSDP). Pairs are taken in
    order; a row is closed when the next pair does not fit (a pair longer than ``row_len`` gets a
    row of its own).

    Returns:
        Rows ``{"tokens", "labels", "positions", "document_ids": list[int], "pairs": list[int]}``;
        ``pairs`` holds the dataset ``index`` of each pair in the row, slot by slot.
    """
    rows: list[dict] = []
    row: dict = {"tokens": [], "labels": [], "positions": [], "document_ids": [], "pairs": []}
    for item in items:
        size = len(item["chosen_tokens"]) + len(item["rejected_tokens"])
        if row["pairs"] and len(row["tokens"]) + size > row_len:
            rows.append(row)
            row = {"tokens": [], "labels": [], "positions": [], "document_ids": [], "pairs": []}
        slot = len(row["pairs"])
        for side, doc in (("chosen", 2 * slot), ("rejected", 2 * slot + 1)):
            tokens = item[f"{side}_tokens"]
            row["tokens"] += tokens
            row["labels"] += item[f"{side}_labels"]
            row["positions"] += list(range(len(tokens)))
            row["document_ids"] += [doc] * len(tokens)
        row["pairs"].append(item["index"])
    if row["pairs"]:
        rows.append(row)
    return rows


def packed_pairs_collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack ``pack_pairs`` rows into tensors [r, s], right-padded to the longest row.

    Padding gets a document id of its own (2 × the row's pairs) and labels -100.

    Returns:
        ``{"tokens", "labels", "positions", "document_ids"}`` [r, s], ``lengths`` [r] (real tokens
        per row) and ``pairs`` [r, k] (dataset index of slot j of each row, -1 where a row has fewer).
    """
    seq_len = max(len(r["tokens"]) for r in rows)
    slots = max(len(r["pairs"]) for r in rows)
    out = {k: torch.zeros((len(rows), seq_len), dtype=torch.long) for k in ("tokens", "labels", "positions", "document_ids")}
    out["tokens"].fill_(pad_id)
    out["labels"].fill_(IGNORE_INDEX)
    out["pairs"] = torch.full((len(rows), slots), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["tokens"])
        for key in ("tokens", "labels", "positions", "document_ids"):
            out[key][b, :n] = torch.tensor(r[key], dtype=torch.long)
        out["positions"][b, n:] = torch.arange(seq_len - n)
        out["document_ids"][b, n:] = 2 * len(r["pairs"])
        out["pairs"][b, : len(r["pairs"])] = torch.tensor(r["pairs"], dtype=torch.long)
    out["lengths"] = torch.tensor([len(r["tokens"]) for r in rows], dtype=torch.long)
    return out
