"""Text generation: greedy or temperature + nucleus (top-p) sampling, one or many completions.

    prompt ─► prefill (all prompt tokens at once) ─► sample ─► feed that one token ─► sample ─► …

``generate`` continues one prompt once; ``sample_completions`` draws n completions of one prompt
together (GRPO's group): the prompt is prefilled once, its cache copied to n rows, and the n rows
decode as one batch, each stopping on its own.

With ``use_cache=True`` the model keeps keys/values of earlier positions in a KV cache, so each
new token costs one position. With ``use_cache=False`` every step re-runs the whole sequence; it
is slow, but it is the plain definition, which the tests use to check the cached path.

Works with any model that has ``hidden_states(tokens)``, ``logits(h)``, ``setup_kv_cache(batch,
max_len)`` and ``clear_kv_cache()`` (``tunesmith.models.llama.Llama`` and the families built on it).
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
    """Logits [v] of the last position only: projecting every prompt position would waste a
    [s, v] matrix (v is 49k–128k for real vocabularies)."""
    h = model.hidden_states(tokens)  # [1, s, d]
    return model.logits(h[0, -1])


def _repeat_kv_cache(model: nn.Module, rows: int) -> None:
    """Copy a one-row KV cache to ``rows`` rows (the prompt's keys/values, shared by every sample).

    Prefilling the prompt once and copying its cache costs one prompt forward instead of ``rows``.
    """
    for layer in model.layers:
        cache = layer.attn.kv_cache
        cache.k, cache.v = cache.k.repeat(rows, 1, 1, 1), cache.v.repeat(rows, 1, 1, 1)  # [rows, kvh, max_len, hd]


def _decode(
    model: nn.Module,
    prompt_ids: list[int],
    rows: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stop: set[int],
    generator: torch.Generator | None,
) -> list[list[int]]:
    """``rows`` continuations of one prompt with the KV cache; each row's list ends with its stop token, if any.

    Rows that stopped keep decoding (what they draw is discarded) until every row stopped or
    ``max_new_tokens`` is reached, so all rows advance together as one batch.
    """
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in range(rows)]
    if max_new_tokens == 0:
        return out
    model.setup_kv_cache(1, len(prompt_ids) + max_new_tokens)
    logits = _last_logits(model, torch.tensor([prompt_ids], device=device))  # prefill once: [v]
    if rows > 1:
        _repeat_kv_cache(model, rows)
    logits = logits.expand(rows, -1)  # [rows, v]
    done = torch.zeros(rows, dtype=torch.bool)
    stop_ids = torch.tensor(sorted(stop), dtype=torch.long)
    for position in range(max_new_tokens):
        tokens = sample_next(logits, temperature, top_p, generator).cpu()  # [rows]
        for i in (~done).nonzero()[:, 0].tolist():
            out[i].append(int(tokens[i]))
        done |= torch.isin(tokens, stop_ids)
        if bool(done.all()) or position == max_new_tokens - 1:
            break
        h = model.hidden_states(tokens.to(device)[:, None])  # [rows, 1, d]: the cache holds the rest
        logits = model.logits(h[:, -1])  # [rows, v]
    return out


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
    prompt_ids = prompt.tolist() if isinstance(prompt, Tensor) else [int(t) for t in prompt]
    if not prompt_ids:
        raise ValueError("sample_completions() needs a non-empty prompt (at least a BOS token)")
    if num_samples < 1 or max_new_tokens < 0:
        raise ValueError(f"need num_samples >= 1 and max_new_tokens >= 0, got {num_samples} and {max_new_tokens}")
    was_training = model.training
    model.eval()  # no dropout (e.g. LoRA dropout) while generating
    try:
        with torch.inference_mode():
            return _decode(model, prompt_ids, num_samples, max_new_tokens, temperature, top_p,
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
    agree: Callable[[int], int] | None = None,
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
        agree: Maps each picked token to the one to continue with; processes that generate in
            lockstep (FSDP: every rank runs every forward) pass rank 0's token to all of them.

    Returns:
        The generated token ids (without the prompt and without the stop token).
    """
    prompt_ids = prompt.tolist() if isinstance(prompt, Tensor) else [int(t) for t in prompt]
    if not prompt_ids:
        raise ValueError("generate() needs a non-empty prompt (at least a BOS token)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    stop = set(int(t) for t in stop_ids)
    device = next(model.parameters()).device

    was_training = model.training
    model.eval()  # no dropout (e.g. LoRA dropout) while generating
    new_tokens: list[int] = []
    try:
        with torch.inference_mode():
            if use_cache:
                new_tokens = _decode(model, prompt_ids, 1, max_new_tokens, temperature, top_p, stop, generator)[0]
                if new_tokens and new_tokens[-1] in stop:
                    new_tokens.pop()
                return new_tokens
            for _ in range(max_new_tokens):
                logits = _last_logits(model, torch.tensor([prompt_ids + new_tokens], device=device))
                token = int(sample_next(logits, temperature, top_p, generator))
                if agree is not None:
                    token = agree(token)
                if token in stop:
                    break
                new_tokens.append(token)
    finally:
        if use_cache:
            model.clear_kv_cache()
        model.train(was_training)
    return new_tokens
