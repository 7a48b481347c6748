"""An Ollama ``Modelfile`` for an exported GGUF: the chat template in Ollama's Go-template syntax.

Ollama renders prompts with Go's ``text/template``, not Jinja, so the model's chat template is
written again for each chat format we know, from the same markers the Jinja template uses:

    ChatML   <|im_start|>role\\ncontent<|im_end|>\\n                  (SmolLM2, Qwen2.5, Qwen3)
    Llama 3  <|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>
    Gemma    <start_of_turn>user\\n(system\\n\\n)content<end_of_turn>\\n   (assistant is "model")
    Mistral  [INST] (system\\n\\n)user[/INST] answer</s>               (system before the first user turn)
    Phi-3    <|role|>\\ncontent<|end|>\\n                            (Phi-4-mini: no newlines)

BOS is not in the templates: llama.cpp adds it when the GGUF says ``add_bos_token``. A default system
prompt that the Jinja template inserts by itself (SmolLM2's) becomes the Modelfile's ``SYSTEM``, which
Ollama uses when the conversation has none. End-of-turn tokens become ``PARAMETER stop`` lines.
"""

from __future__ import annotations

import re
from pathlib import Path

from tunesmith.data.tokenizer import END_OF_TURN_TOKENS, Tokenizer

def _phi_template(newline: str) -> str:
    """Phi-3's format (``newline`` after each role marker and end) or Phi-4-mini's (none)."""
    return (
        f"{{{{- if .System }}}}<|system|>{newline}{{{{ .System }}}}<|end|>{newline}{{{{ end }}}}"
        "{{- range $i, $_ := .Messages }}"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
        f"{{{{- if eq .Role \"user\" }}}}<|user|>{newline}{{{{ .Content }}}}<|end|>{newline}"
        f"{{{{ if $last }}}}<|assistant|>{newline}{{{{ end }}}}"
        f"{{{{- else if eq .Role \"assistant\" }}}}<|assistant|>{newline}{{{{ .Content }}}}"
        f"{{{{ if not $last }}}}<|end|>{newline}{{{{ end }}}}"
        "{{- end }}"
        "{{- end }}"
    )


# {{ .System }} is the system prompt; .Messages the turns (system turns are skipped: they are .System).
# $last marks the final message, after which a user turn opens the assistant's reply.
GO_TEMPLATES = {
    "chatml": (
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{- range $i, $_ := .Messages }}"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
        "{{- if eq .Role \"user\" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n"
        "{{ if $last }}<|im_start|>assistant\n{{ end }}"
        "{{- else if eq .Role \"assistant\" }}<|im_start|>assistant\n{{ .Content }}"
        "{{ if not $last }}<|im_end|>\n{{ end }}"
        "{{- end }}"
        "{{- end }}"
    ),
    "llama3": (
        "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{- range $i, $_ := .Messages }}"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
        "{{- if eq .Role \"user\" }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ if $last }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}"
        "{{- else if eq .Role \"assistant\" }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Content }}"
        "{{ if not $last }}<|eot_id|>{{ end }}"
        "{{- end }}"
        "{{- end }}"
    ),
    "gemma": (
        "{{- $system := .System }}"
        "{{- range $i, $_ := .Messages }}"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
        "{{- if eq .Role \"user\" }}<start_of_turn>user\n{{ if $system }}{{ $system }}\n\n{{ end }}"
        "{{ .Content }}<end_of_turn>\n{{ $system = \"\" }}"
        "{{ if $last }}<start_of_turn>model\n{{ end }}"
        "{{- else if eq .Role \"assistant\" }}<start_of_turn>model\n{{ .Content }}"
        "{{ if not $last }}<end_of_turn>\n{{ end }}"
        "{{- end }}"
        "{{- end }}"
    ),
    "mistral": (
        "{{- $system := .System }}"
        "{{- range $i, $_ := .Messages }}"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
        "{{- if eq .Role \"user\" }}[INST] {{ if $system }}{{ $system }}\n\n{{ end }}{{ .Content }}[/INST]"
        "{{ $system = \"\" }}"
        "{{- else if eq .Role \"assistant\" }} {{ .Content }}{{ if not $last }}</s>{{ end }}"
        "{{- end }}"
        "{{- end }}"
    ),
    "phi3": _phi_template("\n"),
    "phi4": _phi_template(""),
}
# The marker that identifies each format in a Jinja chat template, and how its system turn looks
# (Phi-3 and Phi-4-mini share theirs: ``chat_format`` tells them apart by rendering).
MARKERS = {"chatml": "<|im_start|>", "llama3": "<|start_header_id|>", "gemma": "<start_of_turn>", "mistral": "[/INST]",
           "phi3": "<|assistant|>"}
SYSTEM_TURN = {
    "chatml": re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.S),
    "llama3": re.compile(r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.S),
}


def chat_format(tokenizer: Tokenizer) -> str | None:
    """A key of ``GO_TEMPLATES`` from the tokenizer's chat template; None when unknown or absent.

    Llama 2's ``[INST] <<SYS>>`` format is not Mistral's and has no Go template here.
    """
    template = tokenizer.chat_template or ""
    fmt = next((name for name, marker in MARKERS.items() if marker in template), None)
    if fmt == "mistral" and "<<SYS>>" in template:
        return None
    if fmt == "phi3":  # Phi-4-mini writes the same markers without the newlines
        rendered = tokenizer.render_chat([{"role": "user", "content": "?"}], add_generation_prompt=True)
        return "phi3" if "<|user|>\n" in rendered else "phi4"
    return fmt


def default_system_prompt(tokenizer: Tokenizer, fmt: str) -> str | None:
    """The system prompt the Jinja template adds on its own when the conversation has none."""
    pattern = SYSTEM_TURN.get(fmt)
    if pattern is None:
        return None
    found = pattern.search(tokenizer.render_chat([{"role": "user", "content": "?"}], add_generation_prompt=True))
    return found.group(1) if found else None


def modelfile(tokenizer: Tokenizer, gguf_name: str) -> str:
    """The Modelfile text for ``gguf_name`` (a file next to it).

    Args:
        tokenizer: The model's tokenizer (chat template, end-of-turn tokens).
        gguf_name: File name of the GGUF the Modelfile points at (``FROM ./model-q8_0.gguf``).
    """
    lines = [f"FROM ./{gguf_name}"]
    fmt = chat_format(tokenizer)
    if fmt is None:
        lines.append("# no TEMPLATE: this chat template is none of ChatML / Llama 3 / Gemma / Mistral / Phi, so Ollama "
                     "uses the GGUF's own tokenizer.chat_template if it recognises it")
    else:
        lines.append(f'TEMPLATE """{GO_TEMPLATES[fmt]}"""')
        system = default_system_prompt(tokenizer, fmt)
        if system:
            lines.append(f'SYSTEM """{system}"""')
    stops = [t for t in dict.fromkeys([tokenizer.eos_token, *END_OF_TURN_TOKENS])
             if t and tokenizer.token_to_id(t) is not None]
    lines += [f'PARAMETER stop "{t}"' for t in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(tokenizer: Tokenizer, gguf_path: str | Path) -> Path:
    """Write ``Modelfile`` beside ``gguf_path``; ``ollama create NAME -f Modelfile`` in that folder imports it."""
    gguf_path = Path(gguf_path)
    out = gguf_path.parent / "Modelfile"
    out.write_text(modelfile(tokenizer, gguf_path.name))
    return out
