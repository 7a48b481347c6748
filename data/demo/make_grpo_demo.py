"""Write the GRPO demo prompts from the LoRA demo's records: extract name, age and city as JSON.

    python data/demo/make_grpo_demo.py   # rewrites grpo_train.jsonl (first 200 of train.jsonl) and grpo_val.jsonl (32 of val.jsonl)

Each record is a prompt and the answer the reward checks (a column the model never sees)::

    {"prompt": "Extract the person's name, age and city as JSON.\\n\\nMei (74) works as a nurse in Porto.",
     "answer": {"name": "Mei", "age": 74, "city": "Porto"}}

SmolLM2-135M-Instruct answers this zero-shot with JSON about half the time when sampling, but often
wraps it in markdown fences, adds chatter after it, nests or renames fields, or copies the wrong
words; the rewards (``json_match``: share of the three fields right in a JSON object; ``format_json``:
the whole answer is one JSON object) are checked by parsing, so what GRPO must learn is to answer
with exactly the object. Held-out prompts use names and cities that never occur in training.
Standard-library only: the files are reproducible byte for byte.
"""

from __future__ import annotations

import json
import os


def convert(src: str, dst: str, n: int) -> None:
    """The first ``n`` instruct records of ``src`` as prompt/answer records in ``dst``."""
    with open(src, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()][:n]
    with open(dst, "w", encoding="utf-8") as f:
        for r in records:
            prompt = f"{r['instruction']}\n\n{r['input']}"
            f.write(json.dumps({"prompt": prompt, "answer": json.loads(r["output"])}, ensure_ascii=False) + "\n")


def main(out_dir: str | None = None) -> None:
    out_dir = out_dir or os.path.dirname(os.path.abspath(__file__))
    convert(os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "grpo_train.jsonl"), 200)
    convert(os.path.join(out_dir, "val.jsonl"), os.path.join(out_dir, "grpo_val.jsonl"), 32)


if __name__ == "__main__":
    main()
