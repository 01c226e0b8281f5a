"""The training loop: it learns, only LoRA weights move, and the same seed gives the same numbers."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from loralab.engine.data import Encoded, Example, encode_example
from loralab.config.schema import TrainSpec
from loralab.engine.train import IGNORE, collate, eval_loss, plan_steps, train_lora

EXAMPLES = [Example(id=str(i), instruction=f"Say the number {i}.", output=f"The number is {i}.") for i in range(8)]


def encoded(tok):
    return [encode_example(tok, ex, None, 128) for ex in EXAMPLES]


def fresh(folder, seed=0, r=8):
    set_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(folder)
    return get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM"))


def test_plan_steps():
    assert plan_steps(10, TrainSpec(batch_size=2)) == 5
    assert plan_steps(10, TrainSpec(batch_size=3)) == 4  # the last micro-batch is short
    assert plan_steps(10, TrainSpec(batch_size=2, gradient_accumulation=2, epochs=2)) == 5
    assert plan_steps(10, TrainSpec(batch_size=2, max_steps=7)) == 7


def test_collate_masks_padding_out_of_loss_and_attention():
    a = Encoded(input_ids=[5, 6, 7], labels=[IGNORE, 6, 7], prompt_len=1)
    b = Encoded(input_ids=[5], labels=[IGNORE], prompt_len=1)
    batch = collate([a, b], pad_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_training_lowers_loss_and_moves_only_lora_weights(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = fresh(tiny_llama)
    before = {k: v.clone() for k, v in model.named_parameters()}
    enc = encoded(tok)
    start = eval_loss(model, enc, pad_id=tok.pad_token_id)
    res = train_lora(model, enc, TrainSpec(learning_rate=2e-2, batch_size=4, max_steps=30), pad_id=tok.pad_token_id)
    end = eval_loss(model, enc, pad_id=tok.pad_token_id)
    assert end < start - 0.5
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed)
    assert res.steps == 30 and len(res.curve["loss"]) == 30 and res.curve["step"][-1] == 30
    assert res.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert res.tokens == 15 * sum(len(e.input_ids) for e in enc)  # 30 steps of 4 = 15 passes over 8 examples
    assert res.peak_mem_mb > 0 and 0 <= res.padding_share < 1


def test_same_seed_same_numbers(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    spec = TrainSpec(learning_rate=1e-3, batch_size=2, max_steps=6, seed=1)
    runs = []
    for _ in range(2):
        model = fresh(tiny_llama, seed=1)
        res = train_lora(model, encoded(tok), spec, pad_id=tok.pad_token_id)
        runs.append((res.curve["loss"], res.curve["grad_norm"], eval_loss(model, encoded(tok), pad_id=tok.pad_token_id)))
    assert runs[0] == runs[1]
    model = fresh(tiny_llama, seed=2)
    other = train_lora(model, encoded(tok), spec.model_copy(update={"seed": 2}), pad_id=tok.pad_token_id)
    assert other.curve["loss"] != runs[0][0]


def test_eval_loss_counts_response_tokens_only(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    enc = encoded(tok)
    # Changing only the prompt tokens' labels to IGNORE already holds; making every label IGNORE gives nan.
    blind = [Encoded(e.input_ids, [IGNORE] * len(e.labels), e.prompt_len) for e in enc]
    assert torch.isnan(torch.tensor(eval_loss(model, blind, pad_id=tok.pad_token_id)))
    # Batch size must not change a token-weighted mean.
    assert eval_loss(model, enc, pad_id=tok.pad_token_id, batch_size=1) == pytest.approx(
        eval_loss(model, enc, pad_id=tok.pad_token_id, batch_size=8), rel=1e-5)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_neox"])
def test_projecting_only_response_positions_gives_the_full_logits_loss_and_gradients(arch, request):
    from loralab.engine import train as train

    folder = request.getfixturevalue(arch)
    tok = AutoTokenizer.from_pretrained(folder)
    model = fresh(folder)
    with torch.no_grad():  # LoRA B starts at zero: give it weights so its gradients are not trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    # Different lengths (right padding) and one example with no response token at all.
    batch = encoded(tok)[:3] + [Encoded(input_ids=[5, 6, 7], labels=[IGNORE] * 3, prompt_len=3)]
    b = collate(batch, pad_id=tok.pad_token_id, device=torch.device("cpu"))
    inner = type(model.get_base_model())
    assert train._takes_logits_to_keep(model)
    results = []
    for fast in (True, False):
        train._KEEPS[inner] = fast
        model.zero_grad()
        sums, counts = train.token_losses(model, b)
        sums.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((sums.detach(), counts, grads))
    train._KEEPS.pop(inner)
    (s1, c1, g1), (s2, c2, g2) = results
    assert c1.tolist() == c2.tolist() and c1.tolist()[-1] == 0
    assert torch.allclose(s1, s2, rtol=1e-5, atol=1e-5) and s1[-1] == 0
    assert all(torch.allclose(g1[n], g2[n], rtol=1e-4, atol=1e-6) for n in g1)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_neox"])
def test_packed_batches_give_each_example_the_padded_loss_and_gradients(arch, request):
    from loralab.engine import train as train

    folder = request.getfixturevalue(arch)
    tok = AutoTokenizer.from_pretrained(folder)
    model = fresh(folder)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    model.eval()  # no dropout: both layouts must see the same network
    assert train.packs_examples_apart(model)
    # Different lengths, and a last example whose first token is a response token: the seam between
    # examples must not become a target.
    batch = encoded(tok)[:3] + [Encoded(input_ids=[5, 6, 7], labels=[5, 6, 7], prompt_len=0)]
    results = []
    for pack in (True, False):
        b = collate(batch, pad_id=tok.pad_token_id, device=torch.device("cpu"), pack=pack)
        assert ("attention_mask" in b) != pack
        model.zero_grad()
        sums, counts = train.token_losses(model, b)
        sums.sum().backward()
        results.append((sums.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (s1, c1, g1), (s2, c2, g2) = results
    assert c1.tolist() == c2.tolist() and c1.tolist()[-1] == 2  # tokens 6 and 7; token 5 starts the example
    assert torch.allclose(s1, s2, rtol=1e-5, atol=1e-5)
    assert all(torch.allclose(g1[n], g2[n], rtol=1e-4, atol=1e-6) for n in g1)


def test_packing_puts_examples_in_one_row_with_restarting_positions():
    a = Encoded(input_ids=[5, 6, 7], labels=[IGNORE, 6, 7], prompt_len=1)
    b = Encoded(input_ids=[8, 9], labels=[8, 9], prompt_len=0)
    batch = collate([a, b], pad_id=0, device=torch.device("cpu"), pack=True)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]  # 7 must not predict 8
    assert batch["example"].tolist() == [[0, 0, 0, 1, 1]]


def test_a_model_that_lets_packed_examples_see_each_other_gets_padding(tiny_llama, monkeypatch):
    from loralab.engine import train as train

    model = fresh(tiny_llama)
    real_forward = model.get_base_model().forward

    def leaky(*args, position_ids=None, **kw):  # ignores position_ids: one causal mask over the whole row
        return real_forward(*args, **kw)

    monkeypatch.setattr(model.get_base_model(), "forward", leaky)
    monkeypatch.setattr(train, "_PACKS", {})
    assert not train.packs_examples_apart(model)
    assert not train.Batcher(model, 0, torch.device("cpu")).packs([10, 12])


def test_batcher_packs_only_when_it_costs_less_than_padding(tiny_llama):
    from loralab.engine import train as train

    batcher = train.Batcher(fresh(tiny_llama), 0, torch.device("cpu"))
    assert batcher.can_pack
    assert batcher.packs([10, 30])  # a third of the padded row would be padding
    assert not batcher.packs([30, 30])  # no padding to save, and a 4x attention block
    assert not batcher.packs([30])
    batcher.per_token, batcher.per_pair = 1000, 1  # linear layers dominate: even a little padding is worth saving
    assert batcher.packs([28, 30])  # 58 x 1000 + 58^2 < 2 x 30 x 1000 + 2 x 30^2
    batcher.per_pair = 1000  # attention dominates: one big block loses to padding
    assert not batcher.packs([28, 30])


class Recorder:
    """A step hook that writes down what it saw and stops at `stop_at`."""

    def __init__(self, stop_at: int | None = None):
        self.stop_at, self.seen = stop_at, []

    def after_step(self, step):
        self.seen.append((step.step, step.total, step.loss, step.lr, step.model.training))
        return f"enough at {step.step}" if step.step == self.stop_at else None


def test_step_hooks_see_every_step_in_order_and_the_first_stop_wins(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    first, second = Recorder(stop_at=3), Recorder()
    res = train_lora(fresh(tiny_llama), encoded(tok), TrainSpec(learning_rate=1e-3, batch_size=2, max_steps=8),
                     pad_id=tok.pad_token_id, hooks=[first, second])
    assert [s[0] for s in first.seen] == [1, 2, 3] and all(s[1] == 8 and s[4] for s in first.seen)
    assert [s[0] for s in second.seen] == [1, 2]  # not asked once an earlier hook stopped the run
    assert res.steps == 3 and res.stopped_by is first and res.stop_reason == "enough at 3"
    assert [s[2] for s in first.seen] == res.curve["loss"]  # the losses the curve records
    whole = train_lora(fresh(tiny_llama), encoded(tok), TrainSpec(learning_rate=1e-3, batch_size=2, max_steps=4),
                       pad_id=tok.pad_token_id, hooks=[Recorder()])
    assert whole.steps == 4 and whole.stopped_by is None and whole.stop_reason is None


def test_a_batch_stream_restored_from_its_state_gives_the_same_batches_across_epochs():
    from loralab.engine.train import BatchStream

    whole = BatchStream(8, 3, seed=4)
    expected = [next(whole) for _ in range(10)]  # 3 batches an epoch (3, 3, 2): several epochs
    first = BatchStream(8, 3, seed=4)
    head = [next(first) for _ in range(5)]
    again = BatchStream(8, 3, seed=4)
    again.load_state_dict(first.state_dict())
    assert head + [next(again) for _ in range(5)] == expected
    with pytest.raises(ValueError, match="not this run's"):
        BatchStream(8, 2, seed=4).load_state_dict(first.state_dict())


def test_a_trainer_stopped_midway_and_restored_in_a_fresh_model_ends_exactly_as_an_uninterrupted_one(tiny_llama):
    """Dropout (torch RNG), warmup and cosine decay (scheduler), AdamW moments (optimizer) and an epoch
    boundary (data position) all matter here: a state missing any of them changes the numbers."""
    import io
    import random

    import numpy as np

    from loralab.engine.train import Trainer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    spec = TrainSpec(learning_rate=5e-3, batch_size=3, gradient_accumulation=2, max_steps=7, warmup_steps=2,
                     scheduler="cosine", seed=3)

    def model(seed):
        set_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
        return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules="all-linear",
                                               task_type="CAUSAL_LM"))

    def lora(m):
        return {k: v.detach().clone() for k, v in m.named_parameters() if v.requires_grad}

    set_seed(3)
    whole_model = model(3)
    whole = train_lora(whole_model, encoded(tok), spec, pad_id=tok.pad_token_id)

    first = Trainer(model(3), encoded(tok), spec, pad_id=tok.pad_token_id)
    for _ in range(3):
        first.step()
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)  # plain tensors and data: no pickled code needed
    resumed_model = model(99)  # another start, and other generator states: only the checkpoint may count
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    rest = train_lora(resumed_model, encoded(tok), spec, pad_id=tok.pad_token_id, state=state)

    untimed = lambda c: {k: v for k, v in c.items() if k != "seconds"}  # noqa: E731  (wall time differs)
    assert untimed(rest.curve) == untimed(whole.curve)  # every step's loss, grad norm, lr, tokens; 3 from the checkpoint
    assert rest.curve["seconds"][:3] == first.curve["seconds"] and rest.curve["seconds"][3] > rest.curve["seconds"][2]
    assert rest.tokens == whole.tokens and rest.steps == 7 and rest.resumed_at == [3]
    after, expected = lora(resumed_model), lora(whole_model)
    assert all(torch.equal(after[k], expected[k]) for k in expected)
    assert not torch.equal(next(iter(lora(model(99)).values())), next(iter(expected.values())))  # a real restore
    other = Trainer(model(3), encoded(tok), spec.model_copy(update={"max_steps": 8}), pad_id=tok.pad_token_id)
    with pytest.raises(ValueError, match="another run"):
        other.load_state_dict(state)
