"""Export time and file size per GGUF type (and the merged HF folder) for the offline models.

    python bench/bench_export.py [--models smollm2_135m,gemma3_270m] [--out /tmp/tunesmith_export_bench]

Loads each model's base the way its bundled config does (fp32), then writes the merged HF folder and
one GGUF file per type with ``training/final_outputs.output_writers`` — the code path of
``save_merged`` / ``save_gguf`` and the ``export`` recipe — timing each writer alone and printing a
Markdown table of seconds and MiB. The files go to ``--out`` (deleted after each is measured).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from tunesmith.models.gguf_writer import FILE_TYPES
from tunesmith.training.cli import resolve_config_path
from tunesmith.training.config import load_yaml
from tunesmith.training.final_outputs import output_writers
from tunesmith.training.setup import load_model_and_tokenizer, resolve_source


def folder_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2_135m,gemma3_270m")
    ap.add_argument("--out", default="/tmp/tunesmith_export_bench")
    args = ap.parse_args()
    print("| model | output | seconds | MiB |\n|---|---|---:|---:|")
    for config in args.models.split(","):
        values = load_yaml(resolve_config_path(config))
        source = resolve_source(values["model"])
        base = load_model_and_tokenizer(source, values.get("tokenizer"), torch.float32, torch.device("cpu"),
                                        values.get("chat_template"))
        kinds = [("merged HF folder (fp32)", dict(merged=True))] + [(f"GGUF {t}", dict(merged=False, gguf=[t]))
                                                                    for t in FILE_TYPES]
        for label, kw in kinds:
            out = Path(args.out)
            shutil.rmtree(out, ignore_errors=True)
            writers = output_writers(base.model, base.tokenizer, tokenizer_source=source, **kw)
            start = time.perf_counter()
            for folder, write in writers.items():
                write(out / folder)
            seconds = time.perf_counter() - start
            print(f"| {config} | {label} | {seconds:.1f} | {folder_mib(out):.0f} |", flush=True)
        shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
