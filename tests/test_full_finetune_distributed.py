"""The FSDP2 full fine-tune recipe on CPU with gloo: sharding changes nothing, checkpoints survive a
dead rank and reshard on resume (2 → 2 and 2 → 1 processes), and the HF export loads in transformers.

Reference = the same config run as one plain process (no process group, no FSDP). Each torchrun
launch costs a few seconds, so the runs are module fixtures shared by the tests that check them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tunesmith.models import load_pretrained, save_hf_checkpoint
from tunesmith.recipes import full_finetune_distributed as recipe
from tunesmith.training.process_group import init_distributed
from tunesmith.training.sharded_checkpoint import list_dcp_checkpoints, resume_dcp
from tunesmith.training.config import ConfigError, build_config
from tunesmith.training.schedules import warmup_cosine

REPO = Path(__file__).resolve().parent.parent
STEPS, SAVE_EVERY = 4, 2

# Run by torchrun: build the config from JSON, run the recipe, rank 0 writes the losses.
DRIVER = """
import json, os, sys
from tunesmith.recipes import full_finetune_distributed as recipe
from tunesmith.training.config import build_config
values = json.loads(open(sys.argv[1]).read())
result = recipe.main(build_config(recipe.Config, values, []))
if os.environ.get("RANK", "0") == "0":
    open(sys.argv[2], "w").write(json.dumps({"losses": result["losses"], "grad_norms": result["grad_norms"]}))
"""

# A loss that SIGKILLs rank 1 at its 5th training call: step 3 of a run with grad_accum_steps=2,
# after the step-2 checkpoint is complete. Held-out passes (no grad) are not counted.
CRASH_LOSS = """
import os, signal, torch
from tunesmith.training.losses import CrossEntropyLoss

class DieOnRank1(CrossEntropyLoss):
    calls = 0

    def __call__(self, hidden, labels, head):
        if torch.is_grad_enabled():
            DieOnRank1.calls += 1
            if DieOnRank1.calls == 5 and os.environ.get("RANK") == "1":
                os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(hidden, labels, head)
"""


def run_values(model_dir: Path, data: dict[str, Path], out: Path, **overrides) -> dict:
    values = {
        "model": str(model_dir),
        "data": {"train": str(data["train"]), "val": str(data["val"]), "max_seq_len": 64},
        "output_dir": str(out), "device": "cpu", "dtype": "fp32", "batch_size": 4, "grad_accum_steps": 2,
        "max_steps": STEPS, "lr": 1e-3, "warmup_steps": 1, "save_every": SAVE_EVERY, "keep_last": 0,
        "sample_max_new_tokens": 0, "logger": "none", "eval_batches": 1,
    }
    values.update(overrides)
    return values


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(extra_path: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return env


def torchrun(tmp: Path, values: dict, nproc: int = 2, extra_path: Path | None = None) -> tuple[int, dict | None, str]:
    """Launch the recipe on ``nproc`` gloo processes; → (exit code, rank 0's losses and grad norms, output)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "driver.py").write_text(DRIVER)
    (tmp / "cfg.json").write_text(json.dumps(values))
    result = tmp / "losses.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(tmp / "driver.py"), str(tmp / "cfg.json"), str(result)]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(extra_path), capture_output=True, text=True, timeout=240)
    curves = json.loads(result.read_text()) if result.is_file() else None
    return proc.returncode, curves, proc.stdout + proc.stderr


@pytest.fixture
def one_thread(monkeypatch):
    """In-process runs: one thread (2 busy cores; oversubscription makes a tiny run 10x slower)."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tiny_data, tmp_path_factory) -> dict:
    """One process (reference), two processes, and a two-process run whose rank 1 dies in step 3."""
    tmp = tmp_path_factory.mktemp("full_ft")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = recipe.main(build_config(recipe.Config, run_values(tiny_llama_dir, tiny_data, tmp / "one"), []))
    finally:
        torch.set_num_threads(threads)
    # Recomputing blocks in backward (activation checkpointing) must not change anything either.
    two_values = run_values(tiny_llama_dir, tiny_data, tmp / "two", activation_checkpointing=True)
    code, two, log = torchrun(tmp / "launch_two", two_values)
    assert code == 0, log[-3000:]

    # The crash run goes through `tune-run ... --nproc-per-node 2` (the CLI starts torchrun).
    (tmp / "plugins").mkdir()
    (tmp / "plugins" / "crashloss.py").write_text(CRASH_LOSS)
    crash_yaml = tmp / "crash.yaml"
    crash_yaml.write_text(yaml.safe_dump(run_values(tiny_llama_dir, tiny_data, tmp / "crash")))
    cmd = [sys.executable, "-m", "tunesmith.training.cli", "full_finetune_distributed", "--config", str(crash_yaml),
           "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "loss=crashloss.DieOnRank1"]
    crash = subprocess.run(cmd, cwd=REPO, env=clean_env(tmp / "plugins"), capture_output=True, text=True, timeout=240)
    crash_code, crash_log = crash.returncode, crash.stdout + crash.stderr
    return {"tmp": tmp, "single": single, "two": two, "crash_code": crash_code, "crash_log": crash_log}


def test_two_processes_equal_one_process(runs):
    one, two = runs["single"]["losses"], runs["two"]["losses"]
    assert len(one) == len(two) == STEPS
    assert torch.allclose(torch.tensor(two), torch.tensor(one), atol=1e-5, rtol=0)
    assert one[-1] < one[0]  # it trains
    # The global gradient norm (all ranks' shards) equals the one-process norm: gradients are the
    # sum over ranks, not the mean, and clipping sees the whole model.
    assert torch.allclose(torch.tensor(runs["two"]["grad_norms"]), torch.tensor(runs["single"]["grad_norms"]),
                          rtol=1e-5, atol=0)
    w1 = load_file(runs["tmp"] / "one" / "step_000004" / "hf" / "model.safetensors")
    w2 = load_file(runs["tmp"] / "two" / "step_000004" / "hf" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=1e-5, rtol=0, msg=name)


def test_hf_export_loads_in_transformers_with_our_logits(runs, tiny_llama_dir, tmp_path, one_thread):
    """The 2-process HF export (gathered tensor by tensor) in transformers vs our model restored from
    the same run's DCP shards (a different path to the same weights)."""
    import transformers

    hf_dir = runs["tmp"] / "two" / "step_000004" / "hf"
    assert (hf_dir / "tokenizer.json").is_file() and json.loads((hf_dir / "config.json").read_text())["model_type"] == "llama"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()

    ours = load_pretrained(tiny_llama_dir)  # the untrained start, then the trained weights from DCP
    optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    env = init_distributed("cpu")
    # The 2-process final checkpoint (saved right after the held-out pass), resharded onto one process.
    step, micro = resume_dcp(runs["tmp"] / "two", ours, optimizer, warmup_cosine(optimizer, 1, STEPS), env)
    assert (step, micro) == (STEPS, 2 * STEPS)
    tokens = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours.eval()(tokens), atol=1e-4, rtol=0)
        untrained = load_pretrained(tiny_llama_dir)(tokens)
    assert (untrained - ours(tokens)).abs().max() > 1e-3  # the checkpoint holds trained weights

    # Above max_shard_bytes the export splits into model-0000k-of-0000n files + an index.
    split = save_hf_checkpoint(ours, tmp_path / "split", max_shard_bytes=100_000)
    assert len(list(split.glob("model-*-of-*.safetensors"))) > 1 and (split / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(split)(tokens), ours(tokens), atol=0, rtol=0)


def test_dead_rank_leaves_last_checkpoint_and_resume_matches(runs, tiny_llama_dir, tiny_data, one_thread):
    tmp = runs["tmp"]
    assert runs["crash_code"] != 0, runs["crash_log"][-2000:]
    crash = tmp / "crash"
    assert [p.name for p in list_dcp_checkpoints(crash)] == ["step_000002"]
    assert (crash / "LATEST").read_text().strip() == "step_000002"
    # Also a save that died half-way: its temp folder must be ignored and cleaned up.
    (crash / ".tmp-step_000004" / "sharded").mkdir(parents=True)
    shutil.copytree(crash, tmp / "crash_copy")

    # 2 → 2 processes
    code, resumed, log = torchrun(tmp / "launch_resume", run_values(tiny_llama_dir, tiny_data, crash, resume=True))
    assert code == 0, log[-3000:]
    assert not (crash / ".tmp-step_000004").exists()
    expected = torch.tensor(runs["two"]["losses"][SAVE_EVERY:])
    assert torch.allclose(torch.tensor(resumed["losses"]), expected, atol=1e-6, rtol=0)

    # 2 → 1 process (no FSDP): DCP reshards the two files into whole tensors
    values = run_values(tiny_llama_dir, tiny_data, tmp / "crash_copy", resume=True)
    single = recipe.main(build_config(recipe.Config, values, []))["losses"]
    assert torch.allclose(torch.tensor(single), torch.tensor(runs["single"]["losses"][SAVE_EVERY:]), atol=1e-6, rtol=0)


def test_resuming_a_finished_run_trains_and_saves_nothing(runs, tiny_llama_dir, tiny_data, one_thread):
    final = runs["tmp"] / "one" / "step_000004"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in final.rglob("*"))
    values = run_values(tiny_llama_dir, tiny_data, runs["tmp"] / "one", resume=True)
    result = recipe.main(build_config(recipe.Config, values, []))
    assert result["losses"] == [] and result["checkpoint"] == final
    assert sorted((p.name, p.stat().st_mtime_ns) for p in final.rglob("*")) == before


def test_fsdp_only_options_need_torchrun(tiny_llama_dir, tiny_data, tmp_path, one_thread):
    cfg = build_config(recipe.Config, run_values(tiny_llama_dir, tiny_data, tmp_path, compute_dtype="bf16"), [])
    with pytest.raises(ConfigError, match="compute_dtype need FSDP: launch with torchrun"):
        recipe.main(cfg)


@pytest.mark.parametrize("name", ["llama3_1_8b_full", "llama3_1_70b_full", "gemma2_9b_full", "gemma3_12b_full",
                                  "tiny_full_cpu"])
def test_bundled_configs_fit_the_recipe(name):
    from tunesmith.training.cli import CONFIGS_DIR
    from tunesmith.training.config import load_yaml

    path = CONFIGS_DIR / f"{name}.yaml"
    cfg = build_config(recipe.Config, load_yaml(path), [], yaml_name=str(path))  # unknown keys / types raise
    assert path.read_text().startswith("# ") and "GB" in path.read_text().splitlines()[0]  # sizes documented
    assert cfg.batch_size % 2 == 0 and cfg.lr < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL / bf16 mixed precision / CPU offload need a GPU")
def test_nccl_bf16_compute_fp32_reduce_cpu_offload(tiny_llama_dir, tiny_data, tmp_path):
    values = run_values(tiny_llama_dir, tiny_data, tmp_path / "gpu", device="cuda", dtype="fp32",
                        compute_dtype="bf16", reduce_dtype="fp32", activation_checkpointing=True)
    code, curves, log = torchrun(tmp_path / "launch", values, nproc=1)
    assert code == 0, log[-3000:]
    losses = curves["losses"]
    ref = torchrun(tmp_path / "launch_ref", run_values(tiny_llama_dir, tiny_data, tmp_path / "ref"), nproc=1)[1]["losses"]
    assert torch.allclose(torch.tensor(losses), torch.tensor(ref), atol=5e-2, rtol=0)  # bf16 compute ≈ fp32
    code, offloaded, log = torchrun(tmp_path / "launch_off", {**values, "output_dir": str(tmp_path / "off"),
                                                              "cpu_offload": True}, nproc=1)
    assert code == 0, log[-3000:]
    assert torch.allclose(torch.tensor(offloaded["losses"]), torch.tensor(losses), atol=1e-3, rtol=0)
