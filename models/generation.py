"""Text generation: greedy or temperature + nucleus (top-p) sampling, one prompt or a batch.

    prompt(s) ─► prefill (all prompt tokens at once) ─► sample ─► feed that one token ─► sample ─► …

``generate`` continues one prompt, ``generate_batch`` several at once: the prompts are left-padded
into one batch that shares a KV cache, and the model masks the pad slots out (see
``CausalLM.setup_kv_cache``), so every row gets what it would get alone.

With ``use_cache=True`` the model keeps keys/values of earlier positions in a KV cache, so each
new token costs one position. With ``use_cache=False`` every step re-runs the whole sequence; it
is slow, but it is the plain definition, which the tests use to check the cached path.

Works with any model that has ``hidden_states(tokens)``, ``logits(h)``, ``setup_kv_cache(batch,
max_len, left_padding)`` and ``clear_kv_cache()`` (``tunesmith.models.llama.Llama`` and the
families built on it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn


def sample_next(
    logits: Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Pick the next token from logits.

    Greedy (argmax) when ``temperature == 0``. Otherwise the logits are divided by the
    temperature, softmaxed, and, when ``top_p < 1``, cut to the nucleus: the smallest set of
    most-likely tokens whose probabilities add up to at least ``top_p``. The most likely token
    is always kept, so the nucleus is never empty.

    Args:
        logits: Scores [..., v] (any leading shape, e.g. [v] or [b, v]).
        temperature: 0 for greedy; higher flattens the distribution.
        top_p: Nucleus mass in (0, 1]; 1 disables the cut.
        generator: Random generator for reproducible sampling (on the logits' device).

    Returns:
        Token ids, shape ``logits.shape[:-1]`` (a 0-d tensor for 1-d logits), dtype long.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)

    # Softmax in fp32: bf16 probabilities are too coarse for the cumulative sum below.
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token if the mass strictly before it is still short of top_p; the first token
        # has zero mass before it, so it is always kept.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    # multinomial renormalises, so the cut distribution needs no explicit division.
    flat = probs.reshape(-1, probs.shape[-1])
    picked = torch.multinomial(flat, num_samples=1, generator=generator)  # [n, 1]
    return picked.reshape(logits.shape[:-1])


def _last_logits(model: nn.Module, tokens: Tensor) -> Tensor:
    """Logits [b, v] of each row's last position only: projecting every prompt position would waste
    a [b, s, v] tensor (v is 49k–128k for real vocabularies)."""
    h = model.hidden_states(tokens)  # [b, s, d]
    return model.logits(h[:, -1])


def _token_list(prompt: Sequence[int] | Tensor) -> list[int]:
    ids = prompt.tolist() if isinstance(prompt, Tensor) else [int(t) for t in prompt]
    if not ids:
        raise ValueError("generate() needs a non-empty prompt (at least a BOS token)")
    return ids


def generate(
    model: nn.Module,
    prompt: Sequence[int] | Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> list[int]:
    """Continue one prompt and return only the new tokens.

    Args:
        model: A causal LM (see module docstring for what it must provide).
        prompt: Token ids of the prompt, a list or a 1-d tensor; must not be empty.
        max_new_tokens: Most tokens to generate.
        temperature: 0 for greedy decoding, > 0 to sample (see ``sample_next``).
        top_p: Nucleus mass for sampling; ignored when greedy.
        stop_ids: Generation ends when one of these is produced; the stop token is not returned.
        generator: Random generator for reproducible sampling.
        use_cache: Decode with a KV cache (fast) or by re-running the full sequence each step.

    Returns:
        The generated token ids (without the prompt and without the stop token).
    """
    if use_cache:
        return generate_batch(model, [prompt], max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              stop_ids=stop_ids, generator=generator)[0]
    prompt_ids = _token_list(prompt)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    stop = set(int(t) for t in stop_ids)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout (e.g. LoRA dropout) while generating
    new_tokens: list[int] = []
    try:
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                logits = _last_logits(model, torch.tensor([prompt_ids + new_tokens], device=device))[0]
                token = int(sample_next(logits, temperature, top_p, generator))
                if token in stop:
                    break
                new_tokens.append(token)
    finally:
        model.train(was_training)
    return new_tokens


def generate_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int] | Tensor],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
    stop_when: Callable[[list[int]], bool] | None = None,
) -> list[list[int]]:
    """Continue several prompts at once with one KV cache; return each row's new tokens.

    The prompts are left-padded to the longest, so every row's next token comes from the same last
    column; ``setup_kv_cache(left_padding=...)`` masks the pads out and restarts each row's
    positions at its first real token. Rows that have finished keep being fed (their tokens are
    dropped) until every row is done.

    Args:
        model: A causal LM (see module docstring).
        prompts: Token ids of each prompt (lists or 1-d tensors), none empty.
        max_new_tokens: Most tokens to generate per row.
        temperature: 0 for greedy decoding, > 0 to sample (see ``sample_next``).
        top_p: Nucleus mass for sampling; ignored when greedy.
        stop_ids: A row ends when it produces one of these (not returned).
        generator: Random generator for reproducible sampling (rows draw in order).
        stop_when: Called with a row's new tokens after each of its steps; ``True`` ends the row
            (e.g. a stop string appeared in the decoded text). The tokens so far are kept.

    Returns:
        One list of generated ids per prompt, in the prompts' order.
    """
    rows = [_token_list(p) for p in prompts]
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not rows:
        return []
    stop = set(int(t) for t in stop_ids)
    device = next(model.parameters()).device
    longest = max(len(r) for r in rows)
    padding = [longest - len(r) for r in rows]
    tokens = torch.tensor([[0] * pad + r for pad, r in zip(padding, rows)], device=device)  # [b, longest]
    left_padding = torch.tensor(padding, device=device) if any(padding) else None

    was_training = model.training
    model.eval()  # no dropout (e.g. LoRA dropout) while generating
    new_tokens: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    try:
        with torch.inference_mode():
            model.setup_kv_cache(len(rows), longest + max_new_tokens, left_padding=left_padding)
            step_input = tokens  # prefill: the whole prompts in one forward, filling the cache
            for _ in range(max_new_tokens):
                picked = sample_next(_last_logits(model, step_input), temperature, top_p, generator)  # [b]
                for i, token in enumerate(picked.tolist()):
                    if done[i]:
                        continue
                    if token in stop:
                        done[i] = True
                        continue
                    new_tokens[i].append(token)
                    done[i] = stop_when is not None and stop_when(new_tokens[i])
                if all(done):
                    break
                step_input = picked[:, None]  # the cache holds the rest
    finally:
        model.clear_kv_cache()
        model.train(was_training)
    return new_tokens
