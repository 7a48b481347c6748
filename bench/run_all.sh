#!/usr/bin/env bash
# Every benchmark of BENCHMARKS.md with the real settings, one after another, on a QUIET machine.
#
#   bench/run_all.sh            # ≈ 23 min on 2 idle cores; dated logs in bench/results/
#   bench/run_all.sh --quick    # ≈ 3 min smoke test: tiny steps, no compile; logs in /tmp (not results)
#
# Each script runs its sides in their own processes, taking turns, and prints a Markdown table
# (tokens/s or pairs/s, floor share, peak memory, same-run ratio, --dry-run estimate vs measured)
# that pastes into BENCHMARKS.md; the raw log of each goes to bench/results/<date>_<name>.log.
set -euo pipefail
cd "$(dirname "$0")"
QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1
start=$(date +%s)
stage() { echo; echo "=== $1 (at $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s; planned ≈ $2) ==="; }

if (( QUICK )); then
  export BENCH_RESULTS=${BENCH_RESULTS:-/tmp/tunesmith_bench_quick}
  S="--steps 1 --warmup 1 --rounds 1 --gemm-seconds 0.2 --batch 2"
  echo "quick smoke test: ≈ 3 min on 2 idle cores; logs in $BENCH_RESULTS"
  stage "LoRA" "25 s";  python bench_lora.py $S --seq 64 --dtypes bf16 --sides tunesmith,hf_peft --no-compile
  stage "QLoRA" "40 s"; python bench_qlora.py $S --seq 64 --dtypes bf16 --sides tunesmith,hf_bnb --no-compile
  stage "DPO" "60 s";   python bench_dpo.py $S --seq 64
  stage "full fine-tune" "30 s"; python bench_full.py $S --seq 64 --dtypes bf16 --sides tunesmith,hf --no-compile
  stage "distributed" "30 s"; python bench_distributed.py --recipe full_finetune_distributed --config tiny_full_cpu --steps 1 --warmup 1
else
  echo "real run: planned ≈ 23 min on 2 idle cores (LoRA 5, QLoRA 7, DPO 4, full 3, distributed 4)"
  echo "load average now: $(cut -d' ' -f1-3 /proc/loadavg) (should be < 0.5 before starting)"
  stage "LoRA" "5 min";   python bench_lora.py --dtypes bf16,fp32 --sides tunesmith,hf_peft --rounds 2 --steps 4 --warmup 2
  stage "QLoRA" "7 min";  python bench_qlora.py --dtypes bf16,fp32 --sides tunesmith,tunesmith_default,hf_bnb --rounds 2 --steps 3 --warmup 2
  stage "DPO" "4 min";    python bench_dpo.py --dtypes fp32 --rounds 2 --steps 6 --warmup 2
  stage "full fine-tune" "3 min"; python bench_full.py --dtypes bf16,fp32 --sides tunesmith,hf --rounds 1 --steps 3 --warmup 2
  stage "distributed" "4 min"
  python bench_distributed.py --recipe full_finetune_distributed --config tiny_full_cpu --steps 4 --warmup 1 | tee -a "results/$(date +%F)_distributed.log"
  python bench_distributed.py --recipe lora_distributed --config smollm2_135m --steps 3 --warmup 1 | tee -a "results/$(date +%F)_distributed.log"
  python bench_distributed.py --recipe dpo_distributed --config smollm2_135m_dpo --steps 3 --warmup 1 | tee -a "results/$(date +%F)_distributed.log"
fi
echo; echo "all done in $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s"
