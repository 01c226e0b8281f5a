"""Drift: KL(base || adapted) on the base model's own answers, and how many greedy answers stay the same."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import loralab
from loralab.engine.data import end_token_id, prompt_ids
from loralab.engine.drift import DriftResult, base_answers, load_general_prompts, measure_drift
from loralab.engine.generate import Generation, generate_greedy

CAP = 16
TARGETS = {"tiny_llama": ["q_proj", "v_proj", "down_proj"], "tiny_neox": ["query_key_value", "dense_4h_to_h"]}


def _setup(folder: Path, targets: list[str], scale: float = 0.0, dropout: float = 0.0):
    """A tiny model that ends some answers, wrapped with a LoRA whose B is seeded noise times `scale`.

    Returns (plain greedy answers before wrapping, the PeftModel, prompts, generation kwargs).
    """
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [prompt_ids(tokenizer, p["prompt"], None) for p in load_general_prompts()]
    ids = {"eos_token_ids": [end_token_id(tokenizer)], "pad_token_id": tokenizer.pad_token_id}
    _make_it_stop(model, prompts, ids)
    plain = generate_greedy(model, prompts, CAP, **ids)
    # Default LoRA init: A random, B = 0, so the adapter starts as an exact no-op. A is drawn from the
    # global RNG; seeding it keeps every value here independent of which tests ran before.
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        peft_model = get_peft_model(model, config)
    _set_lora_b(peft_model, scale)
    return plain, peft_model, prompts, ids


def _make_it_stop(model, prompts, ids) -> None:
    """Random tiny models never pick the end token; make them pick it where they would pick a token that
    about half the answers contain, so the end-token position is scored for some prompts and not others.
    (The trick from test_generate.py.)"""
    gens = generate_greedy(model, prompts, CAP, **ids)
    rows_with = Counter(t for g in gens for t in set(g.tokens[2:]))
    token = min(rows_with, key=lambda t: (abs(rows_with[t] - len(prompts) / 2), t))
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        head[ids["eos_token_ids"][0]] = head[token] * 1.05


def _set_lora_b(peft_model, scale: float) -> None:
    """Same direction for every scale (fixed seed), so only the size of the perturbation changes."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def _scored_positions(answers: list[Generation]) -> int:
    return sum(len(g.tokens) + g.stopped for g in answers)


# The shipped prompts


def test_general_prompts_ship_with_the_package_in_file_order():
    prompts = load_general_prompts()
    assert len(prompts) >= 20
    assert len({p["id"] for p in prompts}) == len(prompts)
    assert all(isinstance(p["prompt"], str) and p["prompt"].strip() for p in prompts)
    assert all(isinstance(p["id"], str) and p["id"] for p in prompts)
    raw = (Path(loralab.__file__).parent / "resources" / "general_prompts.jsonl").read_text(encoding="utf-8")
    assert [p["id"] for p in prompts] == [json.loads(line)["id"] for line in raw.splitlines() if line.strip()]


# What drift measures


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_neox"])
def test_a_zero_adapter_has_no_drift(request, arch):
    plain, model, prompts, ids = _setup(request.getfixturevalue(arch), TARGETS[arch], scale=0.0)
    result = measure_drift(model, prompts, max_new_tokens=CAP, **ids)

    assert isinstance(result, DriftResult)
    assert result.kl_mean < 1e-6 and max(result.per_prompt_kl) < 1e-6
    assert result.agreement == 1.0
    assert result.n_prompts == len(prompts) == len(result.per_prompt_kl)
    assert {g.stopped for g in plain} == {True, False}, "test needs answers that stop and answers cut by the cap"
    # Every answer token is scored, plus the end token exactly where the base stopped on its own.
    assert result.n_tokens == _scored_positions(plain)


def test_drift_grows_with_the_size_of_the_perturbation(tiny_llama):
    _, model, prompts, ids = _setup(tiny_llama, TARGETS["tiny_llama"])
    base = base_answers(model, prompts, max_new_tokens=CAP, **ids)
    results = []
    for scale in (0.3, 1.0, 3.0):
        _set_lora_b(model, scale)
        results.append(measure_drift(model, prompts, max_new_tokens=CAP, base=base, **ids))
    kls = [r.kl_mean for r in results]
    assert kls[0] > 1e-3
    assert kls == sorted(kls) and len(set(kls)) == len(kls), kls
    assert results[-1].agreement < 1.0
    assert all(r.n_tokens == _scored_positions(base) for r in results)  # positions come from the base alone


def test_kl_matches_a_direct_computation(tiny_llama):
    _, model, prompts, ids = _setup(tiny_llama, TARGETS["tiny_llama"], scale=0.5)
    model.eval()
    base = base_answers(model, prompts, max_new_tokens=CAP, **ids)
    # One answer that stopped (its end token is scored) and one cut off by the cap (nothing after it is).
    picks = [next(i for i, g in enumerate(base) if g.stopped), next(i for i, g in enumerate(base) if not g.stopped)]
    end = ids["eos_token_ids"][0]
    by_hand = []
    for i in picks:
        prompt, answer = prompts[i], base[i]
        full = torch.tensor([prompt + answer.tokens + [end] * answer.stopped])
        with torch.inference_mode():
            with model.disable_adapter():
                log_p = torch.log_softmax(model(full).logits[0].float(), -1)
            log_q = torch.log_softmax(model(full).logits[0].float(), -1)
        per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
        steps = len(answer.tokens) + answer.stopped
        start = len(prompt) - 1  # the logits here predict the first answer token
        expected = per_position[start : start + steps].mean().item()

        result = measure_drift(model, [prompt], max_new_tokens=CAP, batch_size=1, **ids)
        assert result.n_tokens == steps
        assert result.kl_mean == pytest.approx(expected, rel=1e-5, abs=1e-9)
        assert result.per_prompt_kl == [pytest.approx(expected, rel=1e-5, abs=1e-9)]
        # The check can tell positions apart: a window off by one is well outside the tolerance.
        for shift in (-1, 1):
            shifted = per_position[start + shift : start + shift + steps].mean().item()
            assert shifted != pytest.approx(expected, rel=1e-4)
        by_hand.append((expected, steps))

    # Both together: the overall mean weighs each prompt by its token count, not each prompt equally.
    (kl_a, n_a), (kl_b, n_b) = by_hand
    assert n_a != n_b and kl_a != pytest.approx(kl_b, rel=1e-2)  # so the two kinds of mean differ
    pair = measure_drift(model, [prompts[i] for i in picks], max_new_tokens=CAP, batch_size=2, **ids)
    assert pair.n_tokens == n_a + n_b
    assert pair.kl_mean == pytest.approx((kl_a * n_a + kl_b * n_b) / (n_a + n_b), rel=1e-5)
    assert pair.kl_mean != pytest.approx((kl_a + kl_b) / 2, rel=1e-4)


# Batching, reuse, and what the call leaves behind


def test_batching_and_input_order_do_not_change_the_result(tiny_llama):
    _, model, prompts, ids = _setup(tiny_llama, TARGETS["tiny_llama"], scale=0.5)
    assert len({len(p) for p in prompts}) > 4  # mixed lengths, so batches are padded
    one = measure_drift(model, prompts, max_new_tokens=CAP, batch_size=1, **ids)
    four = measure_drift(model, prompts, max_new_tokens=CAP, batch_size=4, **ids)
    reversed_ = measure_drift(model, prompts[::-1], max_new_tokens=CAP, batch_size=4, **ids)

    assert len(set(one.per_prompt_kl)) == len(prompts)  # distinct values, so a mix-up would show
    assert four.per_prompt_kl == pytest.approx(one.per_prompt_kl, rel=1e-5, abs=1e-9)
    assert reversed_.per_prompt_kl[::-1] == pytest.approx(four.per_prompt_kl, rel=1e-5, abs=1e-9)
    assert four.kl_mean == pytest.approx(one.kl_mean, rel=1e-5)
    assert one.n_tokens == four.n_tokens == reversed_.n_tokens
    assert one.agreement == four.agreement == reversed_.agreement


def test_base_answers_come_from_the_base_model_and_can_be_reused(tiny_llama):
    plain, model, prompts, ids = _setup(tiny_llama, TARGETS["tiny_llama"], scale=1.0)
    assert base_answers(model, prompts, max_new_tokens=CAP, **ids) == plain
    assert generate_greedy(model, prompts, CAP, **ids) != plain  # the adapter is still on afterwards

    fresh = measure_drift(model, prompts, max_new_tokens=CAP, **ids)
    # Answers from a larger cap are cut down to this one (greedy output at a smaller cap is a prefix).
    longer = base_answers(model, prompts, max_new_tokens=CAP + 8, **ids)
    assert measure_drift(model, prompts, max_new_tokens=CAP, base=longer, **ids) == fresh
    # A smaller cap cannot be stretched: what the base would have written past it is unknown.
    shorter = base_answers(model, prompts, max_new_tokens=CAP - 4, **ids)
    with pytest.raises(ValueError, match="cut off"):
        measure_drift(model, prompts, max_new_tokens=CAP, base=shorter, **ids)
    with pytest.raises(ValueError, match="answers for"):
        measure_drift(model, prompts, max_new_tokens=CAP, base=plain[:-1], **ids)


def test_runs_in_eval_and_inference_mode_and_restores_the_callers_mode(tiny_llama):
    _, model, prompts, ids = _setup(tiny_llama, TARGETS["tiny_llama"], scale=0.5, dropout=0.5)
    prompts = prompts[:6]
    model.train()  # as a training loop leaves it; LoRA dropout would make both views random
    seen = []
    hook = model.get_base_model().register_forward_pre_hook(
        lambda module, args: seen.append((module.training, torch.is_inference_mode_enabled()))
    )
    try:
        first = measure_drift(model, prompts, max_new_tokens=8, batch_size=4, **ids)
        second = measure_drift(model, prompts, max_new_tokens=8, batch_size=4, **ids)
    finally:
        hook.remove()
    assert seen and set(seen) == {(False, True)}
    assert first == second
    assert model.training
    assert all(m.training for m in model.modules()), "every submodule is back in train mode"


def test_rejects_what_it_cannot_measure(tiny_llama):
    plain, model, prompts, ids = _setup(tiny_llama, TARGETS["tiny_llama"])
    base_model = model.get_base_model()
    assert base_answers(base_model, prompts[:3], max_new_tokens=4, **ids) == generate_greedy(base_model, prompts[:3], 4, **ids)
    with pytest.raises(TypeError, match="PeftModel"):
        measure_drift(base_model, prompts, **ids)  # no adapter, so no base to compare with
    with pytest.raises(ValueError):
        measure_drift(model, prompts, max_new_tokens=0, **ids)
    with pytest.raises(ValueError):
        measure_drift(model, [], **ids)
