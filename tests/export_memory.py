"""Peak host memory of exporting a LoRA / QLoRA model: streaming (merged HF folder, GGUF) vs all at once.

    python tests/export_memory.py [--qlora] [--layers 12] [--hidden 768] OUT_DIR   → one JSON line

Run in a fresh process of its own (tests/test_streaming_export.py does), so the numbers are this
export's alone, whatever else the machine runs: each phase resets the kernel's resident-set
high-water mark (``/proc/self/clear_refs``) and reads it back (``VmHWM``) when done. Freed memory
goes back to the OS at once (the script runs with glibc's ``MALLOC_MMAP_THRESHOLD_=65536``: every
block over 64 KiB is its own mapping, unmapped when freed), so the peak is what the phase held at
its worst, not what the allocator kept from earlier.

Phases, each from the same model (random Llama, LoRA with nonzero B on every linear layer):
    hf         save_hf_checkpoint (streamed: one merged tensor at a time, SafetensorsStream)
    gguf       save_gguf f32 (streamed the same way)
    at_once    the old way: every merged tensor built into one state dict, then written (save_file)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(fn) -> dict[str, float]:
    """Run ``fn``; its peak resident memory above the resident memory before it, in MiB, and seconds."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status_kib("VmRSS")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return {"peak_above_mib": (status_kib("VmHWM") - before) / 1024, "seconds": round(seconds, 2)}


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # glibc reads it at start: run again with it
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--qlora", action="store_true")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--phases", default="hf,gguf,at_once")
    args = parser.parse_args()

    from safetensors.torch import save_file

    from tunesmith.data import load_tokenizer
    from tunesmith.data.gguf_vocab import gguf_tokenizer_metadata
    from tunesmith.models import apply_lora, save_hf_checkpoint
    from tunesmith.models.gguf_writer import save_gguf
    from tunesmith.models.llama import Llama, LlamaConfig
    from tunesmith.models.lora import LoRALinear
    from tunesmith.models.merged_weights import iter_merged_tensors

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_tokenizer_dir

    torch.set_num_threads(1)
    torch.manual_seed(0)
    h = args.hidden
    cfg = LlamaConfig(vocab_size=4096, hidden_size=h, num_layers=args.layers, num_heads=12, num_kv_heads=4,
                      intermediate_size=8 * h // 3 // 64 * 64, max_seq_len=256)
    dtype = torch.bfloat16 if args.qlora else torch.float32
    with torch.device("meta"):
        model = Llama(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    apply_lora(model, targets, rank=8, alpha=16.0, quantize_base=args.qlora)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.weight.normal_(0, 0.01)  # a real update to fold in
    gc.collect()
    merged_bytes = sum(t.numel() * t.element_size() for _, t in iter_merged_tensors(model))
    biggest = max(t.numel() * t.element_size() for _, t in iter_merged_tensors(model))
    gc.collect()
    tok_dir = args.out / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    make_tokenizer_dir(tok_dir)
    vocab = gguf_tokenizer_metadata(load_tokenizer(str(tok_dir)), cfg.vocab_size)

    def at_once() -> None:
        merged = {name: t.detach().clone() for name, t in iter_merged_tensors(model)}
        save_file(merged, args.out / "at_once.safetensors")

    phases = {
        "hf": lambda: save_hf_checkpoint(model, args.out / "merged"),
        "gguf": lambda: save_gguf(model, args.out / "model-f32.gguf", "f32", tokenizer=vocab),
        "at_once": at_once,
    }
    result = {"qlora": args.qlora, "model_rss_mib": status_kib("VmRSS") / 1024, "merged_mib": merged_bytes / 2**20,
              "biggest_tensor_mib": biggest / 2**20}
    for name in args.phases.split(","):
        result[name] = measure(phases[name])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
