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

# Qwen2.5-Instruct's ChatML: with no system message, its default one.
QWEN2_5 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if not (loop.first and message['role'] == 'system') %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen3's ChatML with thinking: an assistant turn's "<think>…</think>" reasoning (in its content, or
# in reasoning_content) is kept only after the last user message, and the final turn there always
# carries a (possibly empty) <think> block; earlier turns show the answer alone.
# enable_thinking=False ends the generation prompt with an empty think block.
QWEN3 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% set ns = namespace(last_query_index=messages|length - 1, found=false) %}"
    "{% for message in messages[::-1] %}"
    "{% if not ns.found and message['role'] == 'user' %}"
    "{% set ns.found = true %}{% set ns.last_query_index = messages|length - 1 - loop.index0 %}"
    "{% endif %}"
    "{% endfor %}"
    "{% for message in messages %}"
    "{% set content = message['content'] %}"
    "{% if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% set reasoning = '' %}"
    "{% if message['reasoning_content'] is string %}"
    "{% set reasoning = message['reasoning_content'] %}"
    "{% elif '</think>' in content %}"
    "{% set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{% set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{% endif %}"
    "{% if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{% else %}"
    "{{ '<|im_start|>assistant\\n' + content }}"
    "{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)

# An optional system message, then turns alternating user/assistant from user: sets `system`, `turns`
# and opens the loop over the turns (Llama 2 and Mistral share it).
_SYSTEM_THEN_ALTERNATING_TURNS = (
    "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
    "{% set turns = messages[1:] if system is not none else messages %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('chat turns must be alternating user/assistant, starting with user (after an optional system message)') }}"
    "{% endif %}"
)

# <s>[INST] <<SYS>>\nsystem\n<</SYS>>\n\nuser [/INST] answer </s>   (Llama 2 chat)
LLAMA2 = (
    _SYSTEM_THEN_ALTERNATING_TURNS +
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

# <s>[INST] user[/INST] answer</s>[INST] …   (Mistral 7B Instruct v0.3). Mistral's own template puts a
# system message before the *last* user message, so a conversation renders differently once a turn is
# added; here it goes before the first one (as Llama 2 does), which keeps every rendering a prefix of
# its continuation, as training and answer-only masks need.
MISTRAL = (
    "{{ bos_token }}" +
    _SYSTEM_THEN_ALTERNATING_TURNS +
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system + '\\n\\n' if loop.first and system is not none else '') + message['content'] + '[/INST]' }}"
    "{% else %}"
    "{{ ' ' + message['content'] | trim + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

# <|user|>\ncontent<|end|>\n<|assistant|>\n…   (Phi-3 / Phi-3.5-mini; a finished conversation ends in EOS)
PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] in ('system', 'user', 'assistant') %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# <|user|>content<|end|><|assistant|>…   (Phi-4-mini: Phi-3's markers without the newlines)
PHI4 = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
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

TEMPLATES = {
    "chatml": CHATML, "llama3": LLAMA3, "llama2": LLAMA2, "gemma": GEMMA, "qwen2_5": QWEN2_5, "qwen3": QWEN3,
    "mistral": MISTRAL, "phi3": PHI3, "phi4": PHI4,
}


def get(name: str) -> str:
    """The Jinja source of a fallback template (a key of ``TEMPLATES``: ``"chatml"``, ``"qwen3"``, …)."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; choose one of {sorted(TEMPLATES)}") from None
