"""Answer-only loss masks equal transformers' ``return_assistant_tokens_mask`` on every template kind.

The reference: each template below also exists in a variant with ``{% generation %}`` tags around
what the assistant writes (its text through the end-of-turn token), which transformers turns into
``assistant_masks``. Our mask is computed from the *untagged* template (the way models ship them),
and must equal the reference token for token; the tagged variant must render the same text and
give the same mask through our own tag support too.

Templates: the four bundled fallbacks, and the real Jinja of SmolLM2, Llama 3.2, Gemma 3,
Qwen2.5, Qwen3 (drops earlier turns' reasoning), Mistral Nemo (moves the system prompt into the
last user turn, so ``messages[:i]`` is not a prefix of the conversation) and Phi-3.5, plus two
synthetic ones: a header that depends on the whole conversation (never a prefix) and a template
that rewrites the content (``upper``). Conversations are multi-turn, with answers that also occur
in earlier user turns, surrounding whitespace, reasoning blocks, and an empty answer.
"""

from __future__ import annotations

import pytest

from tunesmith.data import chat_templates, load_tokenizer

from test_chat_template import masked_runs
from test_gemma_tokenizer import GEMMA3_TEMPLATE
from test_tokenizer import CHATML_SPECIALS, GEMMA_SPECIALS, LLAMA3_SPECIALS, SMOLLM_CHATML, build_bpe_dir, build_spm_dir

transformers = pytest.importorskip("transformers")

# -- real templates (model repos / llama.cpp's models/templates), verbatim --------------------------
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN3 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

MISTRAL_NEMO = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST]" + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST]" + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- message["content"] + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

PHI35 = ("{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + "
         "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + "
         "'<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + "
         "'<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}"
         "{{ eos_token }}{% endif %}")

LLAMA32 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""  # Llama 3.2's template with its tool-calling branches left out (these conversations use no tools)

# Synthetic: the first turn counts the messages, so messages[:i] never renders as a prefix.
COUNTING = ("{{ '<|im_start|>system\nturns=' + messages|length|string + '<|im_end|>\n' }}"
            "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
            "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Synthetic: the template rewrites what the assistant said.
SHOUTING = ("{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' + "
            "message['content'] | upper + '<|im_end|>\n' }}{% else %}{{ '<|im_start|>' + message['role'] + '\n' + "
            "message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tag(template: str, *replacements: tuple[str, str]) -> str:
    """The template with ``{% generation %}`` tags, made by exact replacements (each must apply)."""
    for old, new in replacements:
        assert old in template, old
        template = template.replace(old, new)
    return template


CHATML_TAGGED = ("{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
                 "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
                 "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SMOLLM_TAGGED = tag(SMOLLM_CHATML, ("{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}",
                                    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
                                    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
                                    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                                    "{% endif %}"))
LLAMA3_TAGGED = tag(chat_templates.LLAMA3, (
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}",
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"))
LLAMA2_TAGGED = tag(chat_templates.LLAMA2, ("{{ ' ' + message['content'] | trim + ' ' + eos_token }}",
                                            "{% generation %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endgeneration %}"))
GEMMA_TAGGED = tag(chat_templates.GEMMA, (
    "{{ '<start_of_turn>' + role + '\n' + (system if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}",
    "{{ '<start_of_turn>' + role + '\n' + (system if loop.first else '') }}{% if role == 'model' %}{% generation %}"
    "{{ message['content'] | trim + '<end_of_turn>' }}{% endgeneration %}{{ '\n' }}{% else %}"
    "{{ message['content'] | trim + '<end_of_turn>\n' }}{% endif %}"))
LLAMA32_TAGGED = tag(LLAMA32, (
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}",
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n    {%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{%- else %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}"))
GEMMA3_TAGGED = tag(GEMMA3_TEMPLATE, (
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}",
    "    {%- if message['content'] is string and role == 'model' -%}\n        {% generation %}{{ message['content'] | trim }}"
    "{{ '<end_of_turn>' }}{% endgeneration %}{{ '\n' }}\n    {%- elif message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"), (
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}",
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n"))
QWEN25_TAGGED = tag(QWEN25, (
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}",
    "    {%- if message.role == \"assistant\" and not message.tool_calls %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' }}{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}\n"
    "    {%- elif (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"))
QWEN3_TAGGED = tag(QWEN3, (
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    "            {%- else %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "            {%- endif %}\n"
    "        {%- else %}\n"
    "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "        {%- endif %}",
    "                {{- '<|im_start|>' + message.role + '\\n' }}{% generation %}{{- '<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') + '<|im_end|>' }}{% endgeneration %}\n"
    "            {%- else %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n' }}{% generation %}{{- content + '<|im_end|>' }}{% endgeneration %}\n"
    "            {%- endif %}\n"
    "        {%- else %}\n"
    "            {{- '<|im_start|>' + message.role + '\\n' }}{% generation %}{{- content + '<|im_end|>' }}{% endgeneration %}\n"
    "        {%- endif %}"), (
    "            {%- endfor %}\n        {%- endif %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}",
    "            {%- endfor %}\n        {%- endif %}\n        {{- '\\n' }}\n    {%- elif message.role == \"tool\" %}"))
MISTRAL_TAGGED = tag(MISTRAL_NEMO, ("        {{- message[\"content\"] + eos_token}}",
                                    "        {% generation %}{{- message[\"content\"] + eos_token}}{% endgeneration %}"))
PHI35_TAGGED = tag(PHI35, ("{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}",
                           "{{'<|assistant|>\n'}}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"))
COUNTING_TAGGED = tag(COUNTING, ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}",
                                 "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
                                 "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
                                 "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"))
SHOUTING_TAGGED = tag(SHOUTING, ("{{ '<|im_start|>assistant\n' + message['content'] | upper + '<|im_end|>\n' }}",
                                 "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] | upper + '<|im_end|>' }}"
                                 "{% endgeneration %}{{ '\n' }}"))

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
PHI_SPECIALS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# name → (template, tagged template, tokenizer: (specials, bos, eos, BOS post-processor) or "spm")
TEMPLATES = {
    "chatml": (chat_templates.CHATML, CHATML_TAGGED, (CHATML_SPECIALS, "<|im_start|>", "<|im_end|>", False)),
    "llama3": (chat_templates.LLAMA3, LLAMA3_TAGGED, (LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>", True)),
    "llama2": (chat_templates.LLAMA2, LLAMA2_TAGGED, "spm"),
    "gemma": (chat_templates.GEMMA, GEMMA_TAGGED, (GEMMA_SPECIALS, "<bos>", "<eos>", True)),
    "smollm2": (SMOLLM_CHATML, SMOLLM_TAGGED, (CHATML_SPECIALS, "<|im_start|>", "<|im_end|>", False)),
    "llama3.2": (LLAMA32, LLAMA32_TAGGED, (LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>", True)),
    "gemma3": (GEMMA3_TEMPLATE, GEMMA3_TAGGED, (GEMMA_SPECIALS, "<bos>", "<eos>", True)),
    "qwen2.5": (QWEN25, QWEN25_TAGGED, (QWEN_SPECIALS, None, "<|im_end|>", False)),
    "qwen3": (QWEN3, QWEN3_TAGGED, (QWEN_SPECIALS, None, "<|im_end|>", False)),
    "mistral": (MISTRAL_NEMO, MISTRAL_TAGGED, (MISTRAL_SPECIALS, "<s>", "</s>", False)),
    "phi3.5": (PHI35, PHI35_TAGGED, (PHI_SPECIALS, None, "<|endoftext|>", False)),
    "counting": (COUNTING, COUNTING_TAGGED, (CHATML_SPECIALS, "<|im_start|>", "<|im_end|>", False)),
    "shouting": (SHOUTING, SHOUTING_TAGGED, (CHATML_SPECIALS, "<|im_start|>", "<|im_end|>", False)),
}

SYSTEM = {"role": "system", "content": "You answer in JSON."}
CONVERSATIONS = {
    "multi_turn": [
        {"role": "user", "content": "Maria, 34, recently moved to Lisbon."},
        {"role": "assistant", "content": '{"name": "Maria", "age": 34, "city": "Lisbon"}'},
        {"role": "user", "content": "And: In Oslo lives a 27-year-old named Tom. ünïcode 🙂"},
        {"role": "assistant", "content": "Sure!\n  {\"name\": \"Tom\"}\tdone"},
    ],
    # the answer also occurs, verbatim, in the user turns before it and in the earlier answer
    "answer_in_user_turn": [
        {"role": "user", "content": "Reply with the word: Lisbon"},
        {"role": "assistant", "content": "Lisbon"},
        {"role": "user", "content": "Lisbon again, please: Lisbon"},
        {"role": "assistant", "content": "Lisbon"},
    ],
    "whitespace_and_empty": [
        {"role": "user", "content": "  Say nothing.  "},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Now say hello."},
        {"role": "assistant", "content": "  hello world \n"},
    ],
    "reasoning": [
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "<think>\nsmall sum\n</think>\n\n4"},
        {"role": "user", "content": "3 + 3?"},
        {"role": "assistant", "content": "<think>\nanother one\n</think>\n\n6"},
    ],
}


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """One tiny tokenizer folder per template (built lazily, shared by the module's tests)."""
    made = {}

    def get(name: str) -> str:
        if name not in made:
            template, _, kind = TEMPLATES[name]
            d = tmp_path_factory.mktemp(name.replace(".", "_"))
            if kind == "spm":
                made[name] = build_spm_dir(d, template=template)
            else:
                specials, bos, eos, bos_pp = kind
                made[name] = build_bpe_dir(d, specials, bos, eos, template, bos_post_processor=bos_pp)
        return made[name]

    return get


def reference(path: str, tagged: str, conv: list[dict]) -> tuple[list[int], list[int]]:
    ref = transformers.AutoTokenizer.from_pretrained(path)
    out = ref.apply_chat_template(conv, chat_template=tagged, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


CASES = [(t, c, s) for t in TEMPLATES for c in CONVERSATIONS for s in (False, True)
         if c != "reasoning" or t in ("qwen3", "chatml")]


@pytest.mark.parametrize("template,conv_name,with_system", CASES)
def test_mask_equals_transformers_assistant_mask(tokenizer_dirs, template, conv_name, with_system):
    source, tagged, _ = TEMPLATES[template]
    path = tokenizer_dirs(template)
    conv = ([SYSTEM] if with_system else []) + CONVERSATIONS[conv_name]
    tok, tagged_tok = load_tokenizer(path), _with_template(load_tokenizer(path), tagged)
    assert tok.render_chat(conv) == tagged_tok.render_chat(conv), "the tagged variant must render the same text"
    ids, mask = tok.tokenize_messages(conv)
    ref_ids, ref_mask = reference(path, tagged, conv)
    assert ids == ref_ids
    assert [int(m) for m in mask] == ref_mask, _show(tok, ids, mask, ref_mask)
    assert [int(m) for m in tagged_tok.tokenize_messages(conv)[1]] == ref_mask  # our own {% generation %} support


def _with_template(tok, template):
    tok.chat_template = template
    return tok


def _show(tok, ids, mask, ref_mask) -> str:
    ours = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    theirs = tok.decode([i for i, m in zip(ids, ref_mask) if m], skip_special_tokens=False)
    return f"ours: {ours!r}\ntransformers: {theirs!r}"


# -- every bundled template (fallbacks added later are covered by name) ------------------------------
ALL_SPECIALS = sorted(set(CHATML_SPECIALS + LLAMA3_SPECIALS + GEMMA_SPECIALS + QWEN_SPECIALS + MISTRAL_SPECIALS
                          + PHI_SPECIALS))


@pytest.fixture(scope="module")
def generic_dir(tmp_path_factory):
    """One tokenizer that knows every template's markers (EOS ``</s>``, BOS ``<s>``)."""
    return build_bpe_dir(tmp_path_factory.mktemp("generic"), ALL_SPECIALS, "<s>", "</s>", None)


@pytest.mark.parametrize("name", sorted(chat_templates.TEMPLATES))
def test_every_bundled_template_masks_each_answer_and_its_end_of_turn(generic_dir, name):
    tok = load_tokenizer(generic_dir)
    tok.chat_template = chat_templates.get(name)
    conv = [SYSTEM] + CONVERSATIONS["answer_in_user_turn"][:2] + CONVERSATIONS["multi_turn"][2:]
    ids, mask = tok.tokenize_messages(conv)
    runs = masked_runs(ids, mask)
    answers = [m["content"] for m in conv if m["role"] == "assistant"]
    assert len(runs) == len(answers)
    stops = set(tok.stop_ids)
    for run, answer in zip(runs, answers):
        assert run[-1] in stops, f"{name}: the end-of-turn token closes every trained span"
        assert answer.strip() in tok.decode(run[:-1], skip_special_tokens=False)
    unmasked = tok.decode([i for i, k in zip(ids, mask) if not k], skip_special_tokens=False)
    for m in conv:
        if m["role"] == "user":
            assert m["content"].strip() in unmasked  # nothing of a user turn is trained, even "Lisbon"


def test_template_without_end_of_turn_token_warns_that_the_model_cannot_learn_to_stop(tmp_path):
    template = ("{% for m in messages %}{{ '### ' + m['role'] + ':\n' + m['content'] + '\n\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '### assistant:\n' }}{% endif %}")
    tok = load_tokenizer(build_bpe_dir(tmp_path, CHATML_SPECIALS, "<|im_start|>", "<|im_end|>", template))
    with pytest.warns(UserWarning, match="cannot learn to stop"):
        ids, mask = tok.tokenize_messages(CONVERSATIONS["multi_turn"])
    labelled = tok.decode([i for i, k in zip(ids, mask) if k], skip_special_tokens=False)
    assert labelled == '{"name": "Maria", "age": 34, "city": "Lisbon"}' + "Sure!\n  {\"name\": \"Tom\"}\tdone"


def test_only_the_final_answer_for_preference_pairs(tokenizer_dirs):
    tok = load_tokenizer(tokenizer_dirs("qwen3"))
    conv = CONVERSATIONS["reasoning"]
    ids, mask = tok.tokenize_messages(conv, train_on="last_assistant")
    assert tok.decode([i for i, k in zip(ids, mask) if k], skip_special_tokens=False) == \
        "<think>\nanother one\n</think>\n\n6<|im_end|>"
