"""Prompt data for online RL (GRPO): a prompt per record, every other column kept for the rewards.

    {"prompt": "What is 3 + 4? Reply with the number only.", "answer": "7"}
    {"prompt": [{"role": "system", "content": ...}, {"role": "user", "content": ...}], "answer": "7"}

``prompt`` is a user message (a string) or a conversation (a list of ``{"role", "content"}``
messages ending before the assistant's answer). It is rendered with the model's chat template and
an opening assistant turn. The record's other fields (``answer`` above) are not shown to the model:
they travel with the prompt to the reward functions, which receive them as keyword lists.
"""

from __future__ import annotations

from typing import Any

from tunesmith.data.datasets import ROLES, DataError
from tunesmith.data.tokenizer import Tokenizer


def _prompt_messages(value: Any, field: str, where: str) -> list[dict]:
    """The record's prompt as chat messages, validated."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for j, m in enumerate(value):
            if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: {field}[{j}] must be {{'role': one of {ROLES}, 'content': str}}, got {m}")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"{where}: field {field!r} must be a string or a non-empty list of messages, "
                    f"got {type(value).__name__}")


class PromptDataset:
    """Tokenized prompts with their records' other fields.

    Args:
        records: Dicts from ``load_records``.
        tokenizer: Renders each prompt with the model's chat template (and the assistant opening).
        prompt_field: The field holding the prompt.
        max_prompt_len: Longest prompt in tokens; a longer one is an error naming its record.
        source_name: Where the records came from, for messages when they carry no locations.

    Items are ``{"prompt_ids": list[int], "prompt": str | list[dict], "fields": dict}``: the
    record's prompt as written (what reward functions get as ``prompts``) and its other fields.
    """

    def __init__(self, records: list[dict], tokenizer: Tokenizer, *, prompt_field: str = "prompt",
                 max_prompt_len: int = 512, source_name: str = "data") -> None:
        locations = getattr(records, "locations", None) or [f"{source_name} record {i}" for i in range(len(records))]
        self.items: list[dict] = []
        for record, where in zip(records, locations):
            if prompt_field not in record:
                raise DataError(f"{where}: missing field {prompt_field!r} (fields present: {sorted(record)}); "
                                f"if the prompt has another name, set data.prompt_field=your_name")
            messages = _prompt_messages(record[prompt_field], prompt_field, where)
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            if len(ids) > max_prompt_len:
                raise DataError(f"{where}: the prompt has {len(ids)} tokens, more than data.max_prompt_len="
                                f"{max_prompt_len}; raise it or shorten the prompt")
            fields = {k: v for k, v in record.items() if k != prompt_field}
            self.items.append({"prompt_ids": ids, "prompt": record[prompt_field], "messages": messages,
                               "fields": fields})
        if not self.items:
            raise DataError(f"{source_name}: no prompts ({len(records)} records read)")
        self.field_names = set.intersection(*(set(item["fields"]) for item in self.items))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]
