"""Publish a trained model on the Hugging Face Hub: one repo, one commit, with a model card.

    push_to_hub(repo_id, {"": merged_dir, "adapter": adapter_dir, "model-q8_0.gguf": gguf_file}, card)
        create_repo(exist_ok)  ─►  create_commit([every file + README.md])

``huggingface_hub`` reads the token from ``HF_TOKEN`` (or a ``huggingface-cli login``) and the Hub
address from ``HF_ENDPOINT``; nothing here handles credentials. Everything lands in a single commit, so a
failed upload leaves the repo as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def model_card(
    repo_id: str,
    *,
    base_model: str,
    dataset: str | None = None,
    config_yaml: str | None = None,
    held_out: Mapping[str, float] | None = None,
    files: Sequence[str] = (),
) -> str:
    """The README.md of the repo: Hub metadata (base model, dataset, library) and what was trained how.

    Args:
        repo_id: The repo it describes (its title).
        base_model: The model fine-tuned (a Hub id is linked by the Hub; a local path is shown as is).
        dataset: The training data, when known.
        config_yaml: The run's resolved config, shown verbatim.
        held_out: Held-out losses, e.g. ``{"before": 1.92, "after": 0.71}``.
        files: What the repo holds, listed for the reader.
    """
    meta = ["---", f"base_model: {base_model}" if "/" in base_model and not Path(base_model).exists() else None,
            "library_name: tunesmith", "tags:", "- tunesmith", "- fine-tuned"]
    if dataset and "/" in dataset and not Path(dataset).exists():
        meta += ["datasets:", f"- {dataset}"]
    lines = [line for line in meta if line is not None] + ["---", "", f"# {repo_id.split('/')[-1]}", "",
             f"Fine-tuned from `{base_model}` with tunesmith."]
    if dataset:
        lines += ["", f"Training data: `{dataset}`."]
    if held_out:
        lines += ["", "| held-out loss | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" for k, v in held_out.items()]
    if files:
        lines += ["", "Files:", ""] + [f"- `{f}`" for f in files]
    if config_yaml:
        lines += ["", "Training config:", "", "```yaml", config_yaml.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def push_to_hub(
    repo_id: str,
    contents: Mapping[str, str | Path],
    card: str,
    *,
    private: bool = True,
    commit_message: str = "Upload from tunesmith",
) -> str:
    """Create ``repo_id`` (if needed) and upload ``contents`` plus the card in one commit.

    Args:
        repo_id: ``user/name`` or ``org/name``.
        contents: Path in the repo → local file or folder (a folder's files go under that path;
            ``""`` puts them at the top, where ``from_pretrained(repo_id)`` looks).
        card: README.md text (see ``model_card``).
        private: Create the repo private (an existing repo keeps its visibility).
        commit_message: The commit's title.

    Returns:
        The commit's URL.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    operations: list[Any] = []
    for in_repo, local in contents.items():
        local = Path(local)
        files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
        for f in files:
            rel = f.relative_to(local).as_posix() if local.is_dir() else ""
            path = "/".join(part for part in (in_repo, rel) if part)
            operations.append(CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(f)))
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.create_commit(repo_id, operations, commit_message=commit_message)
    return info.commit_url
