"""Greedy generation at one cap must reproduce generation at every smaller cap, for plain and PEFT models."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from loralab.engine.generate import Generation, at_cap, generate_greedy
from tiny import make_tiny_model

MAX_CAP = 24
QUESTIONS = [
    "What is the capital of France?",
    "def add(a, b):",
    "Hi",
    "Summarize the following text for a reader who is in a hurry, please.",
    "for i in range(10):",
    "Numbers: 1 2 3",
    "The quick brown fox",
    "How many legs does a spider have?",
    "Translate: the cat sits on the mat.",
    "ok",
]


def _load(folder: Path):
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def _prompts(tokenizer) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False
        )
        for q in QUESTIONS
    ]


def _ids(tokenizer) -> dict:
    return {"eos_token_ids": [tokenizer.eos_token_id], "pad_token_id": tokenizer.pad_token_id}


def _reference_greedy(model, prompt: list[int], max_new_tokens: int, eos: int) -> Generation:
    """Slow oracle: one prompt, no padding, no KV cache, full forward pass per token."""
    ids = list(prompt)
    new: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token == eos:
                return Generation(tokens=new, stopped=True)
            new.append(token)
            ids.append(token)
    return Generation(tokens=new, stopped=False)


def _make_it_stop(model, tokenizer, prompts) -> None:
    """Random tiny models never pick the end token; make them pick it where they would pick token X.

    X is a token the model emits for about half the prompts, so some generations stop (at varied
    lengths) and the others run into the cap.
    """
    gens = generate_greedy(model, prompts, MAX_CAP, **_ids(tokenizer))
    rows_with = Counter(t for g in gens for t in set(g.tokens[2:]))  # [2:]: keep answers non-empty
    target = len(prompts) / 2
    token = min(rows_with, key=lambda t: (abs(rows_with[t] - target), t))
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        head[tokenizer.eos_token_id] = head[token] * 1.05


@pytest.fixture(params=["tiny_llama", "tiny_neox"])
def stopping_model(request):
    """A tiny model (each arch) that ends some answers and runs others into MAX_CAP."""
    model, tokenizer = _load(request.getfixturevalue(request.param))
    prompts = _prompts(tokenizer)
    _make_it_stop(model, tokenizer, prompts)
    return model, tokenizer, prompts


def test_generating_once_at_the_largest_cap_gives_every_smaller_cap(stopping_model):
    model, tokenizer, prompts = stopping_model
    full = generate_greedy(model, prompts, MAX_CAP, batch_size=4, **_ids(tokenizer))

    stop_lengths = sorted({len(g.tokens) for g in full if g.stopped})
    assert any(g.stopped for g in full) and any(not g.stopped for g in full), "test needs both outcomes"
    assert len(stop_lengths) >= 2, "test needs answers that stop at different lengths"
    assert all(len(g.tokens) == MAX_CAP for g in full if not g.stopped)

    # Caps right at and right after the shortest and longest stop: where `stopped` flips to True.
    edges = (stop_lengths[0], stop_lengths[-1])
    caps = sorted({1, MAX_CAP - 1} | {k for n in edges for k in (n, n + 1) if 0 < k < MAX_CAP})
    flipped = 0
    for cap in caps:
        separate = generate_greedy(model, prompts, cap, batch_size=4, **_ids(tokenizer))
        derived = [at_cap(g, cap) for g in full]
        assert derived == separate, f"cap {cap}"
        flipped += sum(g.stopped and not d.stopped for g, d in zip(full, derived))
    assert flipped > 0, "some answer must stop after a smaller cap, so at_cap has to clear `stopped`"


def test_matches_one_prompt_at_a_time_without_cache(stopping_model):
    model, tokenizer, prompts = stopping_model
    batched = generate_greedy(model, prompts, MAX_CAP, batch_size=4, **_ids(tokenizer))
    # The slow oracle on a few rows that share batches with longer prompts, so they were padded.
    rows = [2, 5, 9]
    assert {batched[i].stopped for i in rows} == {True, False}
    expected = [_reference_greedy(model, prompts[i], MAX_CAP, tokenizer.eos_token_id) for i in rows]
    assert [batched[i] for i in rows] == expected


def test_results_follow_input_order_not_length_order(tiny_llama):
    model, tokenizer = _load(tiny_llama)
    prompts = _prompts(tokenizer)
    assert sorted(prompts, key=len) != prompts  # lengths are mixed, so sorting does reorder them
    one_by_one = generate_greedy(model, prompts, 12, batch_size=1, **_ids(tokenizer))
    batched = generate_greedy(model, prompts, 12, batch_size=4, **_ids(tokenizer))
    assert batched == one_by_one
    assert len({tuple(g.tokens) for g in batched}) > 1  # distinct outputs, so a mix-up would show
    reversed_ = generate_greedy(model, prompts[::-1], 12, batch_size=4, **_ids(tokenizer))
    assert reversed_[::-1] == batched


def test_pad_token_may_be_the_end_token(tiny_llama):
    """SmolLM2 pads with <|im_end|>, which every chat prompt also contains: padding must come from the mask."""
    model, tokenizer = _load(tiny_llama)
    prompts = _prompts(tokenizer)[:5]
    eos = tokenizer.eos_token_id
    assert all(eos in p for p in prompts)
    gens = generate_greedy(model, prompts, 8, eos_token_ids=[eos], pad_token_id=eos, batch_size=5)
    assert gens == [_reference_greedy(model, p, 8, eos) for p in prompts]


def test_batches_group_prompts_of_similar_length(tiny_llama, monkeypatch):
    model, tokenizer = _load(tiny_llama)
    widths = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: widths.append(kw["input_ids"].shape[1]) or generate(**kw))
    generate_greedy(model, [[5] * 9, [5], [5] * 2, [5] * 8], 2, batch_size=2, **_ids(tokenizer))
    assert widths == [9, 2]  # not [9, 8]: short prompts are not padded to the longest


def test_progress_reports_each_batch_and_adds_up_to_all_prompts(tiny_llama):
    model, tokenizer = _load(tiny_llama)
    calls: list[int] = []
    gens = generate_greedy(model, _prompts(tokenizer), 3, batch_size=4, progress=calls.append, **_ids(tokenizer))
    assert calls == [4, 4, 2]
    assert sum(calls) == len(gens) == len(QUESTIONS)


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None])  # PeftModelForCausalLM / plain PeftModel
def test_peft_model_generates_with_its_adapter_and_in_eval_mode(tiny_neox, task_type):
    model, tokenizer = _load(tiny_neox)
    prompts = _prompts(tokenizer)[:4]
    plain = generate_greedy(model, prompts, 10, **_ids(tokenizer))
    config = LoraConfig(
        r=4, lora_alpha=32, lora_dropout=0.5, target_modules=["query_key_value", "dense_h_to_4h"],
        init_lora_weights=False,  # random B: the adapter changes the output from the start
        task_type=task_type,
    )
    torch.manual_seed(0)
    peft_model = get_peft_model(model, config)
    peft_model.train()  # as left by a training loop; dropout must not leak into greedy decoding

    defaults = model.generation_config

    adapted = generate_greedy(peft_model, prompts, 10, **_ids(tokenizer))

    assert peft_model.training, "the caller's train/eval mode is restored"
    assert model.generation_config is defaults and peft_model.generation_config is defaults
    model.generation_config = replacement = GenerationConfig(max_new_tokens=3)
    assert peft_model.generation_config is replacement, "no stale copy left on the PEFT wrapper"
    peft_model.eval()
    assert adapted == [_reference_greedy(peft_model, p, 10, tokenizer.eos_token_id) for p in prompts]
    assert adapted != plain


def test_checkpoint_generation_defaults_are_ignored(tiny_llama):
    model, tokenizer = _load(tiny_llama)
    prompts = _prompts(tokenizer)[:4]
    clean = generate_greedy(model, prompts, 8, **_ids(tokenizer))
    hostile = GenerationConfig(
        do_sample=True, temperature=5.0, top_k=3, max_length=3, repetition_penalty=10.0,
        no_repeat_ngram_size=1, min_new_tokens=8, forced_eos_token_id=tokenizer.eos_token_id,
        suppress_tokens=[t for g in clean for t in g.tokens[:1]],
    )
    model.generation_config = hostile
    torch.manual_seed(1)
    assert generate_greedy(model, prompts, 8, **_ids(tokenizer)) == clean
    assert model.generation_config is hostile, "the model's own config is put back"


def test_zero_tokens_and_no_prompts(tiny_llama):
    model, tokenizer = _load(tiny_llama)
    calls: list[int] = []
    gens = generate_greedy(model, _prompts(tokenizer)[:3], 0, progress=calls.append, **_ids(tokenizer))
    assert gens == [Generation(tokens=[], stopped=False)] * 3
    assert calls == [3]
    assert generate_greedy(model, [], 5, **_ids(tokenizer)) == []
    with pytest.raises(ValueError):
        generate_greedy(model, [[]], 5, **_ids(tokenizer))


@pytest.mark.parametrize(
    ("gen", "cap", "expected"),
    [
        (Generation([5, 6, 7], stopped=True), 4, Generation([5, 6, 7], stopped=True)),  # end token is step 4
        (Generation([5, 6, 7], stopped=True), 3, Generation([5, 6, 7], stopped=False)),  # cut just before it
        (Generation([5, 6, 7], stopped=True), 1, Generation([5], stopped=False)),
        (Generation([], stopped=True), 1, Generation([], stopped=True)),  # ended at once
        (Generation([5, 6, 7], stopped=False), 3, Generation([5, 6, 7], stopped=False)),
        (Generation([5, 6, 7], stopped=False), 2, Generation([5, 6], stopped=False)),
        (Generation([5, 6, 7], stopped=True), 0, Generation([], stopped=False)),
    ],
)
def test_at_cap(gen, cap, expected):
    assert at_cap(gen, cap) == expected


# The tiny models every test in the project builds on.


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_tiny_model_is_a_function_of_its_seed(tmp_path, arch):
    a = load_file(make_tiny_model(tmp_path / "a", arch, seed=3) / "model.safetensors")
    b = load_file(make_tiny_model(tmp_path / "b", arch, seed=3) / "model.safetensors")
    c = load_file(make_tiny_model(tmp_path / "c", arch, seed=4) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tiny_tokenizer_round_trips_and_renders_chatml(tiny_llama, tiny_neox):
    for folder in (tiny_llama, tiny_neox):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.vocab_size == len(tokenizer) <= 512
        assert (tokenizer.pad_token, tokenizer.eos_token) == ("<|endoftext|>", "<|im_end|>")
        assert model.generation_config.eos_token_id == tokenizer.eos_token_id == model.config.eos_token_id
        assert model.generation_config.pad_token_id == tokenizer.pad_token_id == model.config.pad_token_id
        text = "Ünïcode & code:\n\tdef f(x): return x ** 2  # ok"
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], tokenize=False
        )
        assert chat == (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        )
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_dict=False
        )
        assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
        assert prompt.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2  # special tokens stay whole
