"""Greedy generation, run once at the largest token cap.

Greedy decoding is deterministic, so the output under a smaller cap is a prefix of the output under a
larger one: evaluating several caps costs one generation pass, and `at_cap` derives the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import GenerationConfig


@dataclass(frozen=True)
class Generation:
    """One prompt's output; `stopped` tells a finished answer from one cut off by the cap."""

    tokens: list[int]  # generated ids, without the end token
    stopped: bool  # the model emitted an end token (stopped on its own)


def at_cap(gen: Generation, cap: int) -> Generation:
    """What a run with max_new_tokens=cap would have returned.

    Only valid for caps up to the one `gen` was generated with: beyond it, the tokens that would have
    come next are unknown, and an answer cut off there would look as if it had merely not stopped.
    """
    if cap < 0:
        raise ValueError(f"cap must be >= 0, got {cap}")
    # The end token is step len(tokens) + 1; it counts only if that step is within the cap.
    return Generation(tokens=list(gen.tokens[:cap]), stopped=gen.stopped and len(gen.tokens) < cap)


def generate_greedy(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    eos_token_ids: list[int],
    pad_token_id: int,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Greedy-decode every prompt (token ids) up to `max_new_tokens`; results come back in input order.

    Prompts are batched by length so little compute goes to padding. `progress(n)` is called after each
    batch with the number of prompts that batch finished (an increment, like a progress bar's advance),
    so the calls add up to len(prompts). Works for plain and PEFT-wrapped causal LMs.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not eos_token_ids:
        raise ValueError("eos_token_ids must name at least one end token")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")

    results: list[Generation | None] = [None] * len(prompts)
    # Longest first: an out-of-memory error shows up on the first batch, not after minutes of work.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    # Everything that decides greedy output is set here; _model_defaults_ignored keeps the rest neutral.
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max(max_new_tokens, 1),  # 0 never reaches generate(), which rejects it
        eos_token_id=list(eos_token_ids),
        pad_token_id=pad_token_id,
        use_cache=True,
    )
    device = next(model.parameters()).device
    eos = set(eos_token_ids)

    with eval_mode(model), _model_defaults_ignored(model), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            if max_new_tokens == 0:
                outputs = [[] for _ in batch]
            else:
                input_ids, attention_mask = _left_pad([prompts[i] for i in batch], pad_token_id, device)
                sequences = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=config
                )
                outputs = sequences[:, input_ids.shape[1] :].tolist()
            for i, new in zip(batch, outputs):
                results[i] = _split_at_end(new, eos)
            if progress is not None:
                progress(len(batch))
    return results  # type: ignore[return-value]


def _split_at_end(new: list[int], eos: set[int]) -> Generation:
    """Cut at the first end token; what follows it is padding added while the rest of the batch ran on."""
    for k, token in enumerate(new):
        if token in eos:
            return Generation(tokens=new[:k], stopped=True)
    return Generation(tokens=new, stopped=False)


def _left_pad(prompts: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding keeps every prompt's last token in the final column, where generation continues."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


@contextmanager
def eval_mode(model) -> Iterator[None]:
    """Dropout (LoRA dropout included) would make 'greedy' output random; restore the caller's mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def _model_defaults_ignored(model) -> Iterator[None]:
    """Hide the checkpoint's generation_config.json during the call.

    `generate()` fills every field we leave unset from `model.generation_config` (repetition_penalty,
    min_new_tokens, suppress_tokens, forced_eos_token_id, max_time, ...), and any of those would silently
    change greedy output or its length. PEFT copies its own copy onto the wrapped model, so both are swapped.
    """
    holders = [model]
    if hasattr(model, "get_base_model"):
        holders.append(model.get_base_model())
    # A PeftModel reads generation_config through to the wrapped model; it must not keep its own afterwards.
    saved = [(h, vars(h).get("generation_config"), "generation_config" in vars(h)) for h in holders]
    for holder in holders:
        holder.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for holder, config, own in saved:
            if own:
                holder.generation_config = config
            else:
                del holder.generation_config
