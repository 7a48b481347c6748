"""Text generation: greedy or temperature + nucleus (top-p) sampling, one prompt or a batch.

    prompt(s) ─► prefill (all prompt tokens at once) ─► sample ─► feed that one token ─► sample ─► …

``generate_batch`` continues several prompts at once: they are left-padded into one batch that
shares a KV cache, and the model masks the pad slots out (see ``CausalLM.setup_kv_cache``), so
every row gets what it would get alone. ``generate`` is one prompt of it. ``sample_completions``
draws n completions of ONE prompt (GRPO's group): the prompt is prefilled once, its cache copied
to n rows. All three decode with the same loop (``_decode``): each row stops on its own (a stop
token, or ``stop_when``), and rows that finished keep being fed until every row is done.

With ``use_cache=False`` (``generate``) every step re-runs the whole sequence; it is slow, but it
is the plain definition, which the tests use to check the cached path.

Processes that generate in lockstep (FSDP: every rank runs every forward of the sharded model)
pass ``agree``, which gives every rank rank 0's tokens.

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


def _repeat_kv_cache(model: nn.Module, rows: int) -> None:
    """Copy a one-row KV cache to ``rows`` rows (the prompt's keys/values, shared by every sample).

    Prefilling the prompt once and copying its cache costs one prompt forward instead of ``rows``.
    """
    for layer in model.layers:
        cache = layer.attn.kv_cache
        cache.k, cache.v = cache.k.repeat(rows, 1, 1, 1), cache.v.repeat(rows, 1, 1, 1)  # [rows, kvh, max_len, hd]


Agree = Callable[[Tensor], Tensor]


def _decode(
    model: nn.Module,
    logits: Tensor,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stop: set[int],
    generator: torch.Generator | None,
    stop_when: Callable[[list[int]], bool] | None = None,
    agree: Agree | None = None,
) -> list[list[int]]:
    """Decode from a prefilled KV cache: ``logits`` [b, v] are every row's next-token scores.

    One ``[b, v]`` draw per position (so a run that restores the RNG reproduces its samples). A row
    ends at a stop token, which its list keeps as the last element, or when ``stop_when`` says so;
    finished rows keep being fed (what they draw is dropped) until every row is done or
    ``max_new_tokens`` is reached, so all rows advance together as one batch.
    """
    device = logits.device
    out: list[list[int]] = [[] for _ in range(logits.shape[0])]
    done = [False] * len(out)
    for position in range(max_new_tokens):
        picked = sample_next(logits, temperature, top_p, generator)  # [b]
        if agree is not None:
            picked = agree(picked)
        for i, token in enumerate(picked.tolist()):
            if done[i]:
                continue
            out[i].append(token)
            done[i] = token in stop or (stop_when is not None and stop_when(out[i]))
        if all(done) or position == max_new_tokens - 1:
            break
        h = model.hidden_states(picked.to(device)[:, None])  # [b, 1, d]: the cache holds the rest
        logits = model.logits(h[:, -1])  # [b, v]
    return out


def _without_stop(tokens: list[int], stop: set[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in stop else tokens


def sample_completions(
    model: nn.Module,
    prompt: Sequence[int] | Tensor,
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """``num_samples`` completions of one prompt, decoded together as one batch with the KV cache.

    The rows share the prompt, so it is prefilled once; each row then stops on its own at a stop
    token (end of turn) or after ``max_new_tokens``. Random draws come from ``generator`` (the
    global torch RNG when ``None``), one ``[num_samples, v]`` draw per position, so a run that
    restores the RNG state reproduces its samples exactly.

    Args:
        model: A causal LM (see module docstring for what it must provide).
        prompt: Token ids of the prompt, a list or a 1-d tensor; must not be empty.
        num_samples: Completions to draw (rows of the batch).
        max_new_tokens: Most tokens per completion, the stop token included.
        temperature: 0 for greedy decoding (every row then equals ``generate``'s), > 0 to sample.
        top_p: Nucleus mass for sampling.
        stop_ids: A completion ends when it produces one of these.
        generator: Random generator for the draws.

    Returns:
        ``num_samples`` lists of new token ids; a list that ended at a stop token keeps it as its last
        element (so it can be scored; ``tokenizer.decode`` drops it), a list without one was cut at
        ``max_new_tokens``.
    """
    prompt_ids = _token_list(prompt)
    if num_samples < 1 or max_new_tokens < 0:
        raise ValueError(f"need num_samples >= 1 and max_new_tokens >= 0, got {num_samples} and {max_new_tokens}")
    if max_new_tokens == 0:
        return [[] for _ in range(num_samples)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout (e.g. LoRA dropout) while generating
    try:
        with torch.inference_mode():
            model.setup_kv_cache(1, len(prompt_ids) + max_new_tokens)
            logits = _last_logits(model, torch.tensor([prompt_ids], device=device))  # prefill once: [1, v]
            if num_samples > 1:
                _repeat_kv_cache(model, num_samples)
            return _decode(model, logits.expand(num_samples, -1), max_new_tokens, temperature, top_p,
                           set(int(t) for t in stop_ids), generator)
    finally:
        model.clear_kv_cache()
        model.train(was_training)


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
    agree: Agree | None = None,
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
        agree: Maps each step's picked tokens [1] to the ones to continue with (lockstep ranks:
            rank 0's).

    Returns:
        The generated token ids (without the prompt and without the stop token).
    """
    if use_cache:
        return generate_batch(model, [prompt], max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              stop_ids=stop_ids, generator=generator, agree=agree)[0]
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
                logits = _last_logits(model, torch.tensor([prompt_ids + new_tokens], device=device))  # [1, v]
                picked = sample_next(logits, temperature, top_p, generator)
                token = int((agree(picked) if agree is not None else picked)[0])
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
    agree: Agree | None = None,
) -> list[list[int]]:
    """Continue several prompts at once with one KV cache; return each row's new tokens.

    The prompts are left-padded to the longest, so every row's next token comes from the same last
    column; ``setup_kv_cache(left_padding=...)`` masks the pads out and restarts each row's
    positions at its first real token.

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
        agree: Maps each step's picked tokens [b] to the ones every row continues with
            (lockstep ranks under FSDP: rank 0's).

    Returns:
        One list of generated ids per prompt, in the prompts' order.
    """
    rows = [_token_list(p) for p in prompts]
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not rows or max_new_tokens == 0:
        return [[] for _ in rows]
    stop = set(int(t) for t in stop_ids)
    device = next(model.parameters()).device
    longest = max(len(r) for r in rows)
    padding = [longest - len(r) for r in rows]
    tokens = torch.tensor([[0] * pad + r for pad, r in zip(padding, rows)], device=device)  # [b, longest]
    left_padding = torch.tensor(padding, device=device) if any(padding) else None

    was_training = model.training
    model.eval()  # no dropout (e.g. LoRA dropout) while generating
    try:
        with torch.inference_mode():
            model.setup_kv_cache(len(rows), longest + max_new_tokens, left_padding=left_padding)
            logits = _last_logits(model, tokens)  # prefill: the whole prompts in one forward, filling the cache
            out = _decode(model, logits, max_new_tokens, temperature, top_p, stop, generator, stop_when, agree)
    finally:
        model.clear_kv_cache()
        model.train(was_training)
    return [_without_stop(row, stop) for row in out]
