"""The export recipe on a tiny LoRA checkpoint and a tiny full fine-tune: merged folder in transformers,
GGUF back in our loader, the Ollama Modelfile, user errors, and the Hub upload through the real
``huggingface_hub`` client against a stand-in Hub API on 127.0.0.1."""

from __future__ import annotations

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from export_helpers import with_lora  # noqa: E402
from hub_standin import standin_hub  # noqa: E402

from tunesmith.data import load_tokenizer  # noqa: E402
from tunesmith.models import load_pretrained, save_hf_checkpoint, save_peft_adapter  # noqa: E402
from tunesmith.recipes import export  # noqa: E402
from tunesmith.training import cli  # noqa: E402
from tunesmith.training.config import build_config  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def lora_step(tiny_llama_dir, tmp_path_factory):
    """A run's step folder as lora_single_device leaves it: adapter/ + config.yaml; and the tuned model."""
    step = tmp_path_factory.mktemp("run") / "step_000005"
    model = with_lora(load_pretrained(str(tiny_llama_dir)), TARGETS)
    save_peft_adapter(model, step / "adapter", base_model=str(tiny_llama_dir), rank=4, alpha=8.0, dropout=0.0,
                      targets=TARGETS)
    run = {"model": str(tiny_llama_dir), "tokenizer": None, "chat_template": None,
           "data": {"train": "data/my_chats.jsonl"}, "lora": {"rank": 4, "targets": TARGETS}}
    (step / "config.yaml").write_text(yaml.safe_dump(run))
    return step, model


@pytest.fixture(scope="module")
def tokens(tiny_llama_dir):
    return torch.tensor([load_tokenizer(str(tiny_llama_dir)).encode("red green blue cat dog fish one two three")])


def run_export(**options):
    return export.main(build_config(export.Config, {}, [f"{k}={v}" for k, v in options.items()]))


def test_adapter_checkpoint_exports_merged_folder_gguf_and_modelfile(lora_step, tokens):
    step, model = lora_step
    result = run_export(checkpoint=step, gguf="[f32,q4_0]", merged_dtype="fp32")
    out = step / "export"
    assert result["export_dir"] == out
    with torch.no_grad():
        tuned = model(tokens)
        merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
        assert (merged(tokens).logits - tuned).abs().max().item() <= 1e-4
        assert (load_pretrained(str(out / "gguf" / "model-f32.gguf"))(tokens) - tuned).abs().max().item() <= 1e-4
    assert (out / "gguf" / "model-q4_0.gguf").is_file()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out / "merged")  # the folder stands alone
    assert hf_tok("red green blue").input_ids == load_tokenizer(str(out / "merged")).encode("red green blue")

    modelfile = (out / "gguf" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-f32.gguf\nTEMPLATE \"\"\"{{- if .System }}<|im_start|>system")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "<|endoftext|>"' in modelfile
    assert sorted(p.name for p in step.iterdir()) == ["adapter", "config.yaml", "export"]  # nothing else touched


def test_full_finetune_hf_folder_takes_its_tokenizer_from_the_runs_model(tiny_llama_dir, tokens, tmp_path):
    step = tmp_path / "step_000010"
    model = load_pretrained(str(tiny_llama_dir))
    save_hf_checkpoint(model, step / "hf")  # no tokenizer files beside the weights
    (step / "config.yaml").write_text(yaml.safe_dump({"model": str(tiny_llama_dir)}))
    run_export(checkpoint=step / "hf", gguf="[q8_0]", merged="false", export_dir=tmp_path / "out", name="tiny")
    assert not (tmp_path / "out" / "merged").exists()
    back = load_pretrained(str(tmp_path / "out" / "gguf" / "model-q8_0.gguf"))
    with torch.no_grad():
        assert (back(tokens) - model(tokens)).abs().max().item() <= 3e-2  # q8_0 rounding


@pytest.mark.parametrize("override,message", [
    ("gguf=[q9_0]", "config key 'gguf'"),
    ("push_to_hub=not_a_repo", "config key 'push_to_hub'"),
    ("checkpoint=/no/such/run", "no such folder"),
    ("merged_dtype=fp8", "merged_dtype must be one of"),
])
def test_user_errors_exit_2_naming_the_option(override, message, lora_step, tmp_path, capsys):
    step, _ = lora_step
    config = tmp_path / "export.yaml"
    config.write_text(yaml.safe_dump({"checkpoint": str(step)}))
    assert cli.main(["export", "--config", str(config), override]) == 2
    assert message in capsys.readouterr().err


# ---- the Hub ----------------------------------------------------------------------------------------
@pytest.fixture
def hub(monkeypatch):
    with standin_hub(monkeypatch) as received:
        yield received


def test_push_to_hub_uploads_merged_gguf_adapter_and_card_in_one_commit(lora_step, hub, tiny_llama_dir, tmp_path):
    step, _ = lora_step
    result = run_export(checkpoint=step, gguf="[q8_0]", export_dir=tmp_path / "export", push_to_hub="me/tiny-chat")
    assert result["hub_commit"].endswith("/me/tiny-chat/commit/" + "a" * 40)
    assert hub["create"] == {"name": "tiny-chat", "organization": "me", "visibility": "private"}
    assert hub["commit_path"] == "/api/models/me/tiny-chat/commit/main"
    assert hub["auth"] == {"Bearer hf_standin_token"}
    files = hub["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "model-q8_0.gguf", "Modelfile", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
            "README.md"} <= set(files)
    export_dir = tmp_path / "export"
    assert files["model-q8_0.gguf"] == (export_dir / "gguf" / "model-q8_0.gguf").read_bytes()
    assert files["model.safetensors"] == (export_dir / "merged" / "model.safetensors").read_bytes()
    card = files["README.md"].decode()
    assert "Training data: `data/my_chats.jsonl`." in card
    assert f"Fine-tuned from `{tiny_llama_dir}`" in card and hub["validated"] == card
    assert "```yaml\n" in card and "rank: 4" in card
    assert "- `model-q8_0.gguf`" in card


def test_model_card_names_a_hub_base_and_dataset_in_its_metadata():
    from tunesmith.training.hub import model_card

    card = model_card("me/x", base_model="HuggingFaceTB/SmolLM2-135M-Instruct", dataset="me/chats",
                      held_out={"before": 1.9234, "after": 0.7111})
    head = card.split("---")[1]
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in head and "- me/chats" in head
    assert "| after | 0.7111 |" in card
