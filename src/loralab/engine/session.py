"""An adapter session: one named LoRA adapter on the shared base model, from its creation to its removal.

The base model is loaded once and shared by every run of a process; each run's adapter lives on it under
its own name (PEFT's add_adapter / set_adapter / delete_adapter; never the implicit "default"), so several
adapters can be on one base at once, the session created last being the active, trainable one. A session
owns what its adapter needs beyond PEFT's object: its initialisation strategy (engine.inits, which keeps
the base weights PiSSA/OLoRA rewrite), what the initialisation cost (`init_s`), the adapter as it started
(PiSSA/OLoRA's conversion is made against it), and putting the base back when it goes (`close`, or `with`).

Saved folders are PEFT's standard ones, loadable as the default adapter: adapter_config.json and
adapter_model.safetensors at the folder's root, tensor names without the adapter's name."""

from __future__ import annotations

import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from loralab.config.schema import LoraSpec
from loralab.engine.inits import InitMethod, InitSource, resolve_init


def adapter_name(key: str) -> str:
    """A PEFT adapter name for a run id or label: letters, digits and underscores (a module key)."""
    return "run_" + re.sub(r"\W", "_", key)


class AdapterSession:
    """One named adapter on `base` (an engine.models.LoadedModel): `create()` puts it on (seeded, timed),
    `save(folder)` writes it, `close()` takes it off and leaves the base as loaded for the next one."""

    def __init__(self, base, name: str, lora: LoraSpec, targets: Any, *, seed: int,
                 source: InitSource | None = None):
        if not name.isidentifier():
            raise ValueError(f"adapter name {name!r}: use letters, digits and underscores (engine.session.adapter_name)")
        self.base, self.name, self.lora, self.targets, self.seed = base, name, lora, targets, seed
        self.source = source
        self.init: InitMethod = resolve_init(lora.init)
        self.model = None  # the PeftModel over the base while the adapter is on it
        self.init_s = 0.0  # what the initialisation cost (PEFT's own, EVA's pass, LoftQ's fit, an SVD or QR)
        self.init_dir: Path | None = None  # the adapter as it started (PiSSA/OLoRA: converted against it)

    def __enter__(self) -> "AdapterSession":
        return self if self.model is not None else self.create()

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def on(cls, base) -> dict[str, "AdapterSession"]:
        """The sessions whose adapters are on `base` now, by name."""
        return base.adapters

    def create(self) -> "AdapterSession":
        """A fresh adapter of the run's settings, initialised from its seed (LoRA init, dropout and data
        order all follow it). An initialisation that rewrites the base (PiSSA, OLoRA) needs the base to
        itself: another adapter on it would train and evaluate on the rewritten weights."""
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

        others = self.on(self.base)
        if self.name in others:
            raise ValueError(f"an adapter named {self.name!r} is on the base already")
        if others and (self.init.converts or any(s.init.converts for s in others.values())):
            raise ValueError(f"lora.init {self.lora.init} with other adapters on the base: PiSSA and OLoRA rewrite "
                             f"the shared base weights, so they need the base to themselves (on it: {', '.join(others)})")
        set_seed(self.seed)
        lora = self.lora
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=self.targets,
                            bias=lora.bias, task_type="CAUSAL_LM", use_rslora=lora.use_rslora, use_dora=lora.use_dora,
                            layers_to_transform=lora.layers, rank_pattern=lora.rank_pattern or {},
                            alpha_pattern=lora.alpha_pattern or {}, **self.init.peft_init())
        self.init.prepare(self.base.model, self.targets, self.source)
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # PEFT calls a transformers API deprecated for v6; not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            # EVA with low_cpu_mem_usage would allow bigger batches than EVA_BATCH; ours are small
            warnings.filterwarnings("ignore", message=".*eva initialization used with low_cpu_mem_usage.*")
            if others:
                self.model = next(iter(others.values())).model
                self.model.add_adapter(self.name, config)
                self.model.set_adapter(self.name)
            else:
                self.model = get_peft_model(self.base.model, config, adapter_name=self.name)
            others[self.name] = self
            try:
                self.init.apply(self.model, self.name)
            except BaseException:
                self.close()  # the shared base without this half-made adapter
                raise
        self.init_s = time.perf_counter() - t0
        return self

    def activate(self) -> None:
        """Make this adapter the one the model runs and trains (the others stay on the base, frozen)."""
        self.model.set_adapter(self.name)

    def keep_start(self, folder: Path) -> None:
        """Save the adapter as it starts, for an initialisation whose trained adapter is stored converted
        against it (PiSSA, OLoRA); nothing for the others."""
        if not self.init.converts:
            return
        self.init_dir = Path(folder)
        shutil.rmtree(self.init_dir, ignore_errors=True)
        self.model.peft_config[self.name].init_lora_weights = True  # as PEFT's conversion expects it saved
        save_adapter(self.model, self.init_dir, self.name)

    def save(self, folder: Path) -> None:
        """The adapter in PEFT's format, in `folder`: as trained, or (PiSSA, OLoRA) converted to a plain
        LoRA on the original base weights (rank 2r, DoRA magnitudes kept), which loads on the unchanged base."""
        if self.init.converts:
            self.init.save_converted(self.model, folder, self.name, self.init_dir)
        else:
            save_adapter(self.model, folder, self.name)

    def load(self, folder: Path) -> "AdapterSession":
        """Put the adapter saved in `folder` on the base under this name, taking this session's own off
        first (the base whole again): a stored adapter evaluated again, a converted PiSSA/OLoRA adapter
        evaluated as it is stored."""
        from peft import PeftModel

        self.close()
        self.init = InitMethod(self.lora.init)  # a plain LoRA now: saved as it is, nothing to put back
        others = self.on(self.base)
        if others:
            self.model = next(iter(others.values())).model
            self.model.load_adapter(str(folder), adapter_name=self.name)
            self.model.set_adapter(self.name)
        else:
            self.model = PeftModel.from_pretrained(self.base.model, folder, adapter_name=self.name)
        others[self.name] = self
        return self

    def adopt(self, state: dict | None) -> dict | None:
        """A Trainer state saved when adapters were all named "default" (a checkpoint of an earlier loralab),
        its tensor names under this adapter's name; any other state as it is."""
        if state is None or "trainable" not in state:
            return state
        mine = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if sorted(state["trainable"]) == sorted(mine):
            return state
        own = re.compile(rf"(?<=\.){re.escape(self.name)}(?=\.|$)")
        legacy = {own.sub("default", n): n for n in mine}
        if sorted(state["trainable"]) != sorted(legacy):
            return state  # another run's: the Trainer refuses it with its message
        return {**state, "trainable": {legacy[k]: v for k, v in state["trainable"].items()}}

    def close(self) -> None:
        """Take the adapter off the base and put back what its initialisation rewrote. With it the last
        adapter on the base, the LoRA layers go and the base is as loaded (quantized layers, biases that
        `lora.bias` trained: shared by every adapter, so put back only then)."""
        if self.model is None:
            return
        others = self.on(self.base)
        others.pop(self.name, None)
        model, self.model = self.model, None
        if others:
            with warnings.catch_warnings():  # PEFT says which adapter it makes active instead: not the user's to act on
                warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
                model.delete_adapter(self.name)
            self.init.restore(self.base.model)
        else:
            _unwrap(self.base, model, self.init)


def save_adapter(model, folder: Path, name: str) -> None:
    """One adapter of a PEFT model in PEFT's standard folder: PEFT saves an adapter not named "default" in
    a subfolder of that name (its files as the default's would be); they are moved up to the folder's root."""
    folder = Path(folder)
    model.save_pretrained(folder, selected_adapters=[name])  # adapter_config.json + adapter_model.safetensors
    if name != "default":
        sub = folder / name
        for f in sub.iterdir():
            f.replace(folder / f.name)
        sub.rmdir()


def close_all(base, peft_model=None) -> None:
    """Every adapter off the base (each session closed); `peft_model`: one loaded without a session."""
    sessions = list(AdapterSession.on(base).values())
    for s in reversed(sessions):
        s.close()
    if not sessions and peft_model is not None:
        _unwrap(base, peft_model)


def _unwrap(base, peft_model, init: InitMethod | None = None) -> None:
    """The LoRA layers out of the base, and the base as loaded: its quantized layers and every bias
    (restore_loaded), then the weights an initialisation rewrote."""
    from loralab.engine.models import restore_loaded

    base.model = peft_model.unload()  # removes the LoRA layers
    restore_loaded(base)
    if init is not None:
        init.restore(base.model)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(base.model, attr):
            try:
                delattr(base.model, attr)
            except AttributeError:
                pass
