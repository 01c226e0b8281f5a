"""Adapter sessions (engine.session) and the lora.init table (engine.inits): named adapters share one tiny
base without touching each other; a PiSSA/OLoRA session leaves the base bit-equal; what a session saves is
PEFT's standard folder, which plain PEFT loads as the default adapter with the same outputs."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loralab.config.schema import INITS, LoraSpec
from loralab.engine import inits
from loralab.engine.models import LoadedModel
from loralab.engine.session import AdapterSession, adapter_name, close_all

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 2]])


def loaded(folder) -> LoadedModel:
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    return LoadedModel(model, None, "tiny", str(folder), "f", "llama", torch.device("cpu"), torch.float32)


def session(base, name, init="default", seed=0, r=4) -> AdapterSession:
    return AdapterSession(base, name, LoraSpec(r=r, alpha=2 * r, dropout=0.0, init=init), ["q_proj", "v_proj"], seed=seed)


def adapter_weights(model, name) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{name}." in n}


def train_steps(model, steps=3) -> None:
    """A few plain SGD steps on whatever the model trains (its active adapter's tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    model.train()
    for _ in range(steps):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_two_named_adapters_on_one_base_train_save_and_go_without_touching_each_other(tiny_llama, tmp_path):
    base = loaded(tiny_llama)
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    a = session(base, "run_a", seed=1).create()
    b = session(base, "run_b", seed=2).create()  # the one created last is the active, trainable one
    assert a.model is b.model and set(AdapterSession.on(base)) == {"run_a", "run_b"}
    assert "default" not in a.model.peft_config
    assert all(".run_b." in n for n, p in b.model.named_parameters() if p.requires_grad)
    a_start = adapter_weights(a.model, "run_a")
    train_steps(b.model)
    b_trained = adapter_weights(b.model, "run_b")
    assert all(torch.equal(a_start[n], w) for n, w in adapter_weights(a.model, "run_a").items())  # a untouched
    b.save(tmp_path / "b")
    assert sorted(f.name for f in (tmp_path / "b").iterdir() if f.name != "README.md") == [
        "adapter_config.json", "adapter_model.safetensors"]  # PEFT's folder, not a run_b subfolder
    b_out = logits(b.model)
    a.activate()
    a_out = logits(a.model)
    b.close()  # deleting b keeps a on the base, usable, as it was
    assert set(AdapterSession.on(base)) == {"run_a"} and "run_b" not in a.model.peft_config
    assert torch.equal(logits(a.model), a_out)
    assert all(torch.equal(a_start[n], w) for n, w in adapter_weights(a.model, "run_a").items())
    a.close()
    assert all(torch.equal(before[n], p) for n, p in base.model.named_parameters())
    assert not AdapterSession.on(base) and not hasattr(base.model, "peft_config")
    plain = PeftModel.from_pretrained(base.model, tmp_path / "b")  # plain PEFT: the default adapter
    assert torch.allclose(logits(plain), b_out, atol=1e-6)
    names = set(adapter_weights(plain, "default"))
    assert {n.replace(".run_b.", ".default.") for n in b_trained} == names


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_session_that_rewrites_the_base_puts_it_back_bit_equal_and_saves_it_converted(tiny_llama, tmp_path, init):
    base = loaded(tiny_llama)
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    with session(base, "run_p", init=init) as s:
        s.keep_start(tmp_path / "start")
        changed = [n for n, p in s.model.base_model.model.named_parameters() if "base_layer.weight" in n
                   and not torch.equal(p, before[n.replace(".base_layer", "")])]
        assert changed  # trains on the residual base
        train_steps(s.model)
        trained = logits(s.model)
        s.save(tmp_path / "p")
        with pytest.raises(ValueError, match="need the base to themselves"):
            session(base, "run_q").create()
    assert all(torch.equal(before[n], p) for n, p in base.model.named_parameters())
    plain = PeftModel.from_pretrained(base.model, tmp_path / "p")  # rank 2r on the original weights
    assert plain.peft_config["default"].r == 8
    assert torch.allclose(logits(plain), trained, atol=1e-4)
    close_all(base, plain)


def test_a_checkpoint_of_an_adapter_named_default_continues_under_the_run_s_name(tiny_llama):
    base = loaded(tiny_llama)
    with session(base, adapter_name("abc123")) as s:
        mine = {n: p.detach().clone() for n, p in s.model.named_parameters() if p.requires_grad}
        legacy = {"trainable": {n.replace(".run_abc123.", ".default."): v for n, v in mine.items()}, "step": 3}
        assert s.adopt(legacy)["trainable"].keys() == mine.keys() and s.adopt(legacy)["step"] == 3
        other = {"trainable": {"x.lora_A.default.weight": torch.zeros(1)}}
        assert s.adopt(other) is other  # another run's state: the Trainer refuses it with its own message


def test_each_init_the_schema_accepts_has_one_strategy():
    assert set(inits.INIT_METHODS) == set(INITS)
    assert isinstance(inits.resolve_init("pissa_niter_4"), inits.PiSSA)
    assert inits.resolve_init("eva_rho_1").rho == 1.0 and inits.resolve_init("eva").rho == 2.0
    assert [k for k, c in inits.INIT_METHODS.items() if c.converts] == ["pissa", "olora"]
    assert [k for k, c in inits.INIT_METHODS.items() if not c.timed] == ["default"]
    with pytest.raises(ValueError, match="registered twice"):
        inits.register(type("Again", (inits.InitMethod,), {"name": "eva"}))
    with pytest.raises(ValueError, match="not one config.schema accepts"):
        inits.register(type("New", (inits.InitMethod,), {"name": "corda"}))
