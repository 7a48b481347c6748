"""Fallback chat templates for tokenizers that ship none, picked by name.

A model's own template (tokenizer_config.json or GGUF ``tokenizer.chat_template``) always wins;
these exist for base models fine-tuned into chat models. They are written here in the same
Jinja dialect transformers renders (``trim_blocks``/``lstrip_blocks``), so every newline that
matters is spelled ``'\\n'`` inside an expression rather than left as template text.

    tokenizer.chat_template = chat_templates.get("chatml")
"""

from __future__ import annotations

# <|im_start|>role\ncontent<|im_end|>\n   (Qwen, SmolLM, many community models)
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# <|begin_of_text|><|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>   (Llama 3.x)
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# <s>[INST] <<SYS>>\nsystem\n<</SYS>>\n\nuser [/INST] answer </s>   (Llama 2 chat)
LLAMA2 = (
    "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
    "{% set turns = messages[1:] if system is not none else messages %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Llama 2 chat needs turns alternating user/assistant, starting with user') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% set text = message['content'] | trim %}"
    "{% if loop.first and system is not none %}"
    "{% set text = '<<SYS>>\\n' + system | trim + '\\n<</SYS>>\\n\\n' + text %}"
    "{% endif %}"
    "{{ bos_token + '[INST] ' + text + ' [/INST]' }}"
    "{% else %}"
    "{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

# <bos><start_of_turn>user\ncontent<end_of_turn>\n<start_of_turn>model\n...   (Gemma; a system message is
# folded into the first user turn, as Gemma 3's own template does)
GEMMA = (
    "{{ bos_token }}"
    "{% set system = messages[0]['content'] + '\n\n' if messages and messages[0]['role'] == 'system' else '' %}"
    "{% set turns = messages[1:] if system else messages %}"
    "{% for message in turns %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (system if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "llama2": LLAMA2, "gemma": GEMMA}


def get(name: str) -> str:
    """The Jinja source of a fallback template: ``"chatml"``, ``"llama3"``, ``"llama2"`` or ``"gemma"``."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; choose one of {sorted(TEMPLATES)}") from None
