"""Our native model as an lm-evaluation-harness model: lm-eval's tasks run through our own forward
and ``generate_batch``, never through a second copy of the model in ``transformers``.

    lm = TunesmithLM(model, tokenizer, batch_size=8)
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"], task_manager=TaskManager(include_path=...))

lm-eval asks a model three kinds of question; each is answered the way lm-eval's Hugging Face
backend (``HFLM``) answers it, so the numbers compare with published ones:

- ``loglikelihood(context, continuation)``: Σ log p(continuation tokens | context), and whether
  greedy decoding would produce them. Tokenization is lm-eval's own (``TemplateLM._encode_pair``:
  the continuation is the tokens of context + continuation after those of the context; an empty
  context becomes the prefix token, BOS or else EOS); too-long inputs lose tokens on the left.
- ``loglikelihood_rolling(text)``: the whole text's log-likelihood in windows of ``max_length``
  (lm-eval's ``get_rolling_token_windows``: every token is predicted exactly once).
- ``generate_until(context, gen_kwargs)``: greedy (or sampled, with ``do_sample``) continuation,
  ending at EOS / end of turn, at ``max_gen_toks``, or at the first ``until`` string, which is cut off.

Requests are sorted longest first (lm-eval's ``Collator``), so each batch of ``batch_size`` pads
little, and the answers are returned in the order asked. Scoring runs the model once per batch
and projects only the continuation positions to the vocabulary (never the [b, s, v] logits);
generation decodes a batch of prompts with one KV cache.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from torch import nn
from tqdm import tqdm

from tunesmith.models.generation import generate_batch

HONOURED_GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p"}


class TunesmithLM(TemplateLM):
    """An ``lm_eval.api.model.LM`` over a tunesmith model (base, with adapters, merged or NF4).

    Args:
        model: A native causal LM (``hidden_states``, ``logits``, KV cache), in eval mode or not.
        tokenizer: Its ``tunesmith.data.Tokenizer``.
        batch_size: Requests scored or generated together.
        max_length: Longest input in tokens; 0 means the model's ``max_seq_len``.
        max_gen_toks: Longest generation when a task does not say.
        name: Shown by lm-eval (and part of its request-cache key).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, batch_size: int = 8, max_length: int = 0,
                 max_gen_toks: int = 256, name: str = "tunesmith") -> None:
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._device = next(model.parameters()).device
        self.batch_size = max(1, batch_size)
        self.max_length = max_length or model.config.max_seq_len
        self.max_gen_toks = max_gen_toks
        self.name = name

    # -- what lm-eval asks about the tokenizer --------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context becomes: BOS, or EOS for models without one (as ``HFLM``)."""
        bos = self.tokenizer.bos_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids with the model's own special tokens (BOS where its tokenizer adds one), except
        when the text already starts with BOS (a chat template wrote it)."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.render_chat(chat_history, add_generation_prompt=add_generation_prompt)

    # -- loglikelihood --------------------------------------------------------------------------------
    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """Score ``(cache key, context ids, continuation ids)`` requests, ``batch_size`` at a time.

        Row r of a batch is ``(context + continuation)[-(max_length + 1):][:-1]``; the logits at its
        last ``len(continuation)`` positions predict the continuation tokens.
        """
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm)
        for chunk in order.get_batched(n=self.batch_size):
            rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            longest = max(len(r) for r in rows)
            tokens = torch.tensor([r + [self.tokenizer.pad_id] * (longest - len(r)) for r in rows],
                                  device=self._device)  # [b, s], right-padded: causal rows ignore what follows
            hidden = self.model.hidden_states(tokens)  # [b, s, d]
            row_index, positions, targets = [], [], []
            for i, ((_, _, cont), row) in enumerate(zip(chunk, rows)):
                row_index += [i] * len(cont)
                positions += range(len(row) - len(cont), len(row))
                targets += cont
            logits = self.model.logits(hidden[row_index, positions]).float()  # [Σ cont, v]
            logprobs = torch.log_softmax(logits, dim=-1)
            target = torch.tensor(targets, device=self._device)
            token_lp = logprobs.gather(-1, target[:, None]).squeeze(-1)  # [Σ cont]
            token_greedy = logprobs.argmax(dim=-1) == target
            start = 0
            for key, _, cont in chunk:
                end = start + len(cont)
                answer = (float(token_lp[start:end].sum()), bool(token_greedy[start:end].all()))
                results.append(answer)
                if key is not None:  # rolling windows have no cache key of their own
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                start = end
            bar.update(len(chunk))
        bar.close()
        return order.get_original(results)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in disjoint windows of ``max_length`` tokens."""
        windows: list[tuple[int, tuple[None, list[int], list[int]]]] = []
        for i, (text,) in enumerate(req.args for req in requests):
            token_windows = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text),
                                                                prefix_token=self.prefix_token_id,
                                                                max_seq_len=self.max_length, context_len=1)
            windows += [(i, (None, *lm_utils.make_disjoint_window(w))) for w in token_windows]
        scores = self._loglikelihood_tokens([w for _, w in windows], disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for (i, _), (logprob, _) in zip(windows, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation -----------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continue each context (batched, KV cache) until EOS, ``max_gen_toks`` or an ``until`` string."""
        order = Collator([req.args for req in requests], sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                         group_by="gen_kwargs", group_fn=lambda a: a[1])
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        results: list[str] = []
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)  # one gen_kwargs per batch
            ignored = sorted(set(kwargs) - HONOURED_GEN_KWARGS)
            if ignored:
                warnings.warn(f"generate_until: generation options {ignored} are not supported and are ignored")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = kwargs["max_gen_toks"]
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            prompts = [self.tok_encode(c)[-max(1, self.max_length - max_gen):] for c in contexts]

            def reached_stop_string(new: list[int]) -> bool:
                text = self.tokenizer.decode(new)
                return any(s and s in text for s in until)

            outputs = generate_batch(self.model, prompts, max_new_tokens=max_gen, temperature=temperature,
                                     top_p=float(kwargs.get("top_p") or 1.0), stop_ids=self.tokenizer.stop_ids,
                                     stop_when=reached_stop_string)
            for context, new in zip(contexts, outputs):
                text = postprocess_generated_text(self.tokenizer.decode(new), until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
            bar.update(len(chunk))
        bar.close()
        return order.get_original(results)
