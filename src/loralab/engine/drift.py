"""How far an adapter moved the model away from its base on prompts that are not the training task.

A LoRA run can score well on its own task while quietly breaking everything else; drift puts a number
on the "everything else". Two views of it on a fixed set of general prompts (shipped with the package):

- `kl_mean`: KL(base || adapted) per token, under teacher forcing on the base model's own greedy
  answers. Measured where the base model is most sure of itself, so it catches small shifts long
  before they change any output.
- `agreement`: the share of prompts whose greedy answer did not change at all, the view a user sees.

Both sides come from one PeftModel (the base under `disable_adapter()`), so only one copy of the
weights is ever in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.resources import files

import torch

from loralab.engine.generate import Generation, eval_mode, at_cap, generate_greedy

_PROMPTS_RESOURCE = "resources/general_prompts.jsonl"


def load_general_prompts() -> list[dict]:
    """The shipped held-out prompts ({"id", "prompt"}), in file order so results line up run to run."""
    text = files("loralab").joinpath(_PROMPTS_RESOURCE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class DriftResult:
    kl_mean: float  # token-weighted mean KL(base || adapted), nats per token
    agreement: float  # share of prompts with identical greedy answers (tokens and stopped flag)
    n_prompts: int
    n_tokens: int  # answer positions scored: answer tokens, plus the end token where the base stopped
    per_prompt_kl: list[float]  # each prompt's mean over its own positions, in input order


def base_answers(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Greedy answers of the base model; computed once, they can be reused for every adapter of that base."""
    with _base_only(model):
        return generate_greedy(
            model, prompts, max_new_tokens,
            eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, batch_size=batch_size, progress=progress,
        )


def measure_drift(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 32,
    eos_token_ids: list[int],
    pad_token_id: int,
    batch_size: int = 8,
    base: list[Generation] | None = None,
    progress: Callable[[int], None] | None = None,
) -> DriftResult:
    """Drift of `model`'s active adapter from its own base model on `prompts` (token ids).

    `base` may come from `base_answers` at this cap or a larger one (greedy output at a smaller cap is
    a prefix, so it is cut with `at_cap`); answers from a smaller cap are rejected, since the tokens the
    base would have written past it are unknown. `progress(n)` is told of every n prompts done, once per
    pass: the base's answers (without `base`), the adapter's, the KL.
    """
    if not _is_peft(model):
        raise TypeError("measure_drift needs a PeftModel: the base side is the same model with its adapter disabled")
    if max_new_tokens < 1:
        # At 0 there is nothing to score and both means would be 0/0.
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        raise ValueError("measure_drift needs at least one prompt")
    gen = dict(eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, batch_size=batch_size)

    if base is None:
        base = base_answers(model, prompts, max_new_tokens=max_new_tokens, progress=progress, **gen)
    else:
        _check_base(base, prompts, max_new_tokens)
        base = [at_cap(g, max_new_tokens) for g in base]
    adapted = generate_greedy(model, prompts, max_new_tokens, progress=progress, **gen)
    agreement = sum(a == b for a, b in zip(adapted, base)) / len(prompts)

    sums, counts = _teacher_forced_kl(model, prompts, base, pad_token_id, batch_size, progress)
    n_tokens = sum(counts)
    return DriftResult(
        kl_mean=sum(sums) / n_tokens,
        agreement=agreement,
        n_prompts=len(prompts),
        n_tokens=n_tokens,
        per_prompt_kl=[s / n for s, n in zip(sums, counts)],
    )


def _teacher_forced_kl(
    model, prompts: list[list[int]], base: list[Generation], pad_token_id: int, batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[float], list[int]]:
    """Per prompt: the KL summed over the scored positions, and how many there are.

    Input is prompt + answer; the logits at prompt position len(prompt) - 1 + j predict answer step j.
    A stopped answer adds one step, the end token, whose prediction sits after the last answer token;
    which end token it was never matters, as it is never fed back in. An answer cut by the cap has no
    such step, so its last token is dropped from the input: nothing after it is scored.
    """
    rows = []
    for prompt, answer in zip(prompts, base):
        steps = len(answer.tokens) + answer.stopped  # >= 1 for any cap >= 1 (see at_cap)
        fed = answer.tokens if answer.stopped else answer.tokens[:-1]
        rows.append((list(prompt) + list(fed), len(prompt) - 1, steps))

    sums = [0.0] * len(rows)
    counts = [steps for _, _, steps in rows]
    device = next(model.parameters()).device
    # Longest first, like generate_greedy: similar lengths share a batch, and memory errors come early.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]), reverse=True)
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            input_ids, attention_mask = _right_pad([rows[i][0] for i in batch], pad_token_id, device)
            # Right padding keeps every row at positions 0..n-1, so position ids need no correction and,
            # with causal attention, real tokens never see the padding that follows them.
            row_index = torch.cat([torch.full((rows[i][2],), r, dtype=torch.long) for r, i in enumerate(batch)])
            col_index = torch.cat([torch.arange(rows[i][1], rows[i][1] + rows[i][2]) for i in batch])
            with _base_only(model):
                base_logp = _log_probs(model, input_ids, attention_mask, row_index, col_index)
            adapted_logp = _log_probs(model, input_ids, attention_mask, row_index, col_index)
            per_position = (base_logp.exp() * (base_logp - adapted_logp)).sum(-1).double().cpu()
            offset = 0
            for i in batch:
                sums[i] = float(per_position[offset : offset + counts[i]].sum())
                offset += counts[i]
            if progress is not None:
                progress(len(batch))
    return sums, counts


def _log_probs(model, input_ids, attention_mask, row_index, col_index) -> torch.Tensor:
    """float32 log-probabilities at the scored positions only ([positions, vocab]).

    Selecting before the softmax keeps the float32 copy small; half-precision logits would make a small
    KL mostly rounding noise.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return torch.log_softmax(logits[row_index.to(logits.device), col_index.to(logits.device)].float(), dim=-1)


def _right_pad(rows: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for n, row in enumerate(rows):
        ids[n, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[n, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _check_base(base: list[Generation], prompts: list[list[int]], max_new_tokens: int) -> None:
    if len(base) != len(prompts):
        raise ValueError(f"base has {len(base)} answers for {len(prompts)} prompts")
    short = [i for i, g in enumerate(base) if not g.stopped and len(g.tokens) < max_new_tokens]
    if short:
        raise ValueError(
            f"base answers {short[:5]} were cut off before max_new_tokens={max_new_tokens}: "
            "generate them with base_answers at this cap or a larger one"
        )


def _is_peft(model) -> bool:
    # Imported here, as in runner.py: peft is slow to import and only needed once there is an adapter.
    from peft import PeftModel

    return isinstance(model, PeftModel)


@contextmanager
def _base_only(model) -> Iterator[None]:
    """`disable_adapter()` for a PeftModel; a plain model already is the base."""
    if _is_peft(model):
        with model.disable_adapter():
            yield
    else:
        yield
