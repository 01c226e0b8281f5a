"""One readable LoRA training loop, and the held-out loss.

A plain loop rather than `transformers.Trainer`: every number a run records (loss and grad norm
per step, tokens seen, tokens/s, peak memory) is measured here, in one place, with no hidden
host overhead between steps.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

import torch

from loralab.engine.curve import CURVE_KEYS
from loralab.engine.data import Encoded
from loralab.engine.generate import eval_mode
from loralab.config.schema import TrainSpec

IGNORE = -100


@dataclass
class TrainResult:
    steps: int
    curve: dict[str, list[float]]  # per optimizer step: step, loss, grad_norm, lr, tokens, seconds
    tokens: int  # non-padding tokens processed
    wall_s: float
    tokens_per_s: float
    peak_mem_mb: float
    trainable_params: int
    total_params: int
    padding_share: float  # padding tokens / all tokens in the batches
    stopped_by: "StepHook | None" = None  # the hook that ended training before the planned steps
    stop_reason: str | None = None  # what it said
    resumed_at: list[int] = field(default_factory=list)  # steps training continued at from a checkpoint


@dataclass(frozen=True)
class Step:
    """What a step hook sees: one optimizer step, just applied."""

    step: int  # 1-based
    total: int  # planned steps
    loss: float  # mean loss per target token over the step's micro-batches
    grad_norm: float
    lr: float
    model: Any  # the model being trained (a hook may evaluate it; it must leave model.training as it was)
    tokens: int = 0  # non-padding tokens trained so far
    seconds: float = 0.0  # since training started
    trainer: Any = None  # the Trainer that made the step (a checkpoint hook saves its state_dict())

    def row(self) -> dict[str, float]:
        """This step as a row of the training curve (TrainResult.curve's keys): what the workspace
        streams and trackers log."""
        return dict(zip(CURVE_KEYS, (self.step, self.loss, self.grad_norm, self.lr, self.tokens, self.seconds)))


class StepHook(Protocol):
    """Watches training one optimizer step at a time: progress, divergence, pruning, fault points and
    trackers are all step hooks. Implement `after_step`: return a short reason to stop training now
    (the run is then diverged, pruned, ... as the hook's owner decides), or None to go on."""

    def after_step(self, step: Step) -> str | None: ...


class PeakMemory:
    """Peak memory during a block: CUDA's own counter on GPU, a sampled process RSS on CPU."""

    def __init__(self, device: torch.device, interval: float = 0.05):
        self.device, self.interval, self.peak = device, interval, 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            proc = psutil.Process()
            self.peak = proc.memory_info().rss

            def sample():
                while not self._stop.wait(self.interval):
                    self.peak = max(self.peak, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()

    @property
    def mb(self) -> float:
        return self.peak / 2**20


def collate(batch: Sequence[Encoded], pad_id: int, device: torch.device, pack: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad a batch (padding masked out of attention and loss), or pack it into one row.

    Packed: the examples follow each other with their positions restarting at 0, which transformers
    turns into a block-causal mask (each example attends only to itself) and no padding at all;
    `example` says which example each position belongs to.
    """
    if pack:
        ids = [t for e in batch for t in e.input_ids]
        labels = [IGNORE if i == 0 else x for e in batch for i, x in enumerate(e.labels)]  # no target across a seam
        pos = [i for e in batch for i in range(len(e.input_ids))]
        which = [k for k, e in enumerate(batch) for _ in e.input_ids]
        row = lambda xs: torch.tensor([xs], dtype=torch.long, device=device)  # noqa: E731
        return {"input_ids": row(ids), "labels": row(labels), "position_ids": row(pos), "example": row(which)}
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def batch_tokens(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(real tokens, padding tokens) of a collated batch."""
    if "attention_mask" not in batch:
        return batch["input_ids"].numel(), 0
    real = int(batch["attention_mask"].sum())
    return real, batch["attention_mask"].numel() - real


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed next-token cross-entropy over response tokens, and their token counts.

    Sums (not per-batch means) let gradient accumulation and eval weight every token alike. Only
    positions that predict a response token go through the vocabulary projection: on short-answer
    data that skips most of the LM head and softmax (~15% of a step's FLOPs on the built-in model).
    """
    target = batch["labels"][:, 1:]
    counted = target != IGNORE
    packed = "example" in batch
    if packed or _takes_logits_to_keep(model):
        keep = torch.nn.functional.pad(counted, (0, 1))  # position t predicts token t + 1
        where = {"position_ids": batch["position_ids"]} if packed else {"attention_mask": batch["attention_mask"]}
        out = model(input_ids=batch["input_ids"], **where, logits_to_keep=keep, use_cache=False)
        per_token = torch.nn.functional.cross_entropy(out.logits.float(), target[counted], reduction="none")
        if packed:
            rows, n = batch["example"][:, 1:][counted], int(batch["example"][0, -1]) + 1
        else:
            rows, n = counted.nonzero()[:, 0], target.size(0)
        sums = torch.zeros(n, dtype=per_token.dtype, device=per_token.device).index_add(0, rows, per_token)
        return sums, torch.bincount(rows, minlength=n)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits[:, :-1, :].float()
    per_token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE, reduction="none")
    return per_token.view(target.shape).sum(dim=1), counted.sum(dim=1)


_KEEPS: dict[type, bool] = {}


def _takes_logits_to_keep(model) -> bool:
    """Whether the causal LM under any PEFT wrapper accepts a boolean `logits_to_keep` mask
    (transformers >= 4.55 models do; custom remote code may not)."""
    import inspect

    inner = _unwrapped(model)
    cls = type(inner)
    if cls not in _KEEPS:
        _KEEPS[cls] = "logits_to_keep" in inspect.signature(inner.forward).parameters
    return _KEEPS[cls]


def _unwrapped(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class Batcher:
    """Collates batches for one model: packed into one row when the model keeps packed examples
    apart and packing costs less than padding, else right-padded.

    Packing removes padding from every matmul but makes attention one (sum of lengths)^2 block
    instead of batch x (longest)^2, so each batch takes whichever layout costs fewer FLOPs.
    """

    def __init__(self, model, pad_id: int, device: torch.device):
        self.pad_id, self.device = pad_id, device
        cfg = getattr(model, "config", None)
        hidden, layers = getattr(cfg, "hidden_size", None), getattr(cfg, "num_hidden_layers", None)
        self.can_pack = bool(hidden and layers) and packs_examples_apart(model)
        if self.can_pack:
            self.per_token = 2 * sum(p.numel() for p in model.parameters())  # linear layers, forward
            self.per_pair = 4 * hidden * layers  # scores and weighted values, every (query, key) pair

    def packs(self, lengths: Sequence[int]) -> bool:
        if not self.can_pack or len(lengths) < 2:
            return False
        total, width, n = sum(lengths), max(lengths), len(lengths)
        packed = total * self.per_token + total * total * self.per_pair
        padded = n * width * self.per_token + n * width * width * self.per_pair
        return packed < padded

    def __call__(self, batch: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        return collate(batch, self.pad_id, self.device, pack=self.packs([len(e.input_ids) for e in batch]))


_PACKS: dict[tuple, bool] = {}


def packs_examples_apart(model) -> bool:
    """Whether the model keeps examples packed in one row apart (restarting `position_ids` must
    give each its own block-causal attention, as transformers' mask utilities do): checked once
    per model class and attention implementation on 8 tokens, in eval mode so no dropout runs."""
    inner = _unwrapped(model)
    key = (type(inner), getattr(getattr(inner, "config", None), "_attn_implementation", None))
    if key not in _PACKS:
        _PACKS[key] = _check_packing(model)
    return _PACKS[key]


def _check_packing(model) -> bool:
    if not _takes_logits_to_keep(model):
        return False
    device = next(model.parameters()).device
    ids = torch.arange(3, 11, device=device) % int(getattr(model.config, "vocab_size", 11))
    pos = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2], device=device)
    try:
        with eval_mode(model), torch.inference_mode():
            alone = model(input_ids=ids[None, 5:], use_cache=False).logits[0].float()
            packed = model(input_ids=ids[None], position_ids=pos[None], use_cache=False).logits[0, 5:].float()
    except Exception:  # a model that rejects position_ids or packed input simply gets padding
        return False
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 3e-2  # bf16/fp16 round more
    return bool((alone - packed).abs().max() <= tol * (float(alone.abs().max()) + 1e-6))


def plan_steps(n_examples: int, spec: TrainSpec) -> int:
    """Optimizer steps for the run: max_steps, else epochs over the data."""
    return spec.planned_steps(n_examples)


def micro_batches(n_examples: int, spec: TrainSpec) -> Iterator[list[int]]:
    """Example indices per micro-batch: a seeded shuffle each epoch, repeated as long as asked."""
    return iter(BatchStream(n_examples, spec.batch_size, spec.seed))


class BatchStream:
    """Example indices per micro-batch: a seeded shuffle each epoch. Its state is how many micro-batches
    it has given: the same seed replays the same order, so a restored stream skips that many."""

    def __init__(self, n_examples: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n_examples, batch_size, seed
        self.given = 0
        self._g = torch.Generator().manual_seed(seed)
        self._order: list[int] = []
        self._at = 0  # next index into _order

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> list[int]:
        if self._at >= len(self._order):
            self._order, self._at = torch.randperm(self.n, generator=self._g).tolist(), 0
        out = self._order[self._at:self._at + self.batch_size]
        self._at += self.batch_size
        self.given += 1
        return out

    def state_dict(self) -> dict:
        return {"given": self.given, "n": self.n, "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if (state["n"], state["batch_size"], state["seed"]) != (self.n, self.batch_size, self.seed):
            raise ValueError(f"the data position was saved for {state['n']} examples in batches of "
                             f"{state['batch_size']} with seed {state['seed']}, not this run's")
        self.__init__(self.n, self.batch_size, self.seed)
        for _ in range(state["given"]):  # one randperm per epoch: milliseconds even for long runs
            next(self)


def rng_state() -> dict:
    """Every random generator training may draw from (dropout: torch, and cuda on GPU; python and
    numpy for anything else), as plain data torch.load(weights_only=True) reads back."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_optimizer(model, params: list, spec: TrainSpec, loraplus_lr_ratio: float | None):
    device = next(model.parameters()).device
    # One fused kernel for all LoRA tensors instead of a loop of small ops (~6 ms a step on CPU).
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    if loraplus_lr_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        # PEFT gives each parameter group its own weight decay, read from `loraplus_weight_decay` (default 0):
        # a plain `weight_decay` would be overridden by every group and silently ignored.
        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=spec.learning_rate, loraplus_lr_ratio=loraplus_lr_ratio,
                                         loraplus_weight_decay=spec.weight_decay, **fused)
    return torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay, **fused)


CURVE = CURVE_KEYS  # TrainResult.curve's keys


class Trainer:
    """One run's training, a step at a time, with all of its state in `state_dict()`: the trainable
    (LoRA) weights, optimizer, scheduler, data position, random generators, and the curve and counters
    so far. Loaded into a fresh trainer of the same run (`load_state_dict`), training goes on exactly as
    if it had never stopped (torchtune's recipe state: adapter, optimizer, scheduler, steps, RNG, data)."""

    def __init__(self, model, examples: Sequence[Encoded], spec: TrainSpec, *, pad_id: int,
                 loraplus_lr_ratio: float | None = None):
        from transformers import get_scheduler

        if not examples:
            raise ValueError("no training examples")
        self.model, self.examples, self.spec = model, examples, spec
        self.device = next(model.parameters()).device
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self.trainable = sum(p.numel() for p in self.params)
        self.total_params = sum(p.numel() for p in model.parameters())
        self.total = plan_steps(len(examples), spec)
        warmup = spec.warmup_steps or int(round(spec.warmup_ratio * self.total))
        self.opt = make_optimizer(model, self.params, spec, loraplus_lr_ratio)
        self.sched = get_scheduler(spec.scheduler, self.opt, num_warmup_steps=warmup, num_training_steps=self.total)
        self.batches = BatchStream(len(examples), spec.batch_size, spec.seed)
        self.to_batch = Batcher(model, pad_id, self.device)
        self.curve: dict[str, list[float]] = {k: [] for k in CURVE}
        self.step_no = self.seen = self.padded = 0
        self.earlier_s = 0.0  # training seconds of earlier attempts, restored from a checkpoint
        self.resumed_at: list[int] = []  # the steps this run was resumed at
        self._t0: float | None = None

    @property
    def done(self) -> bool:
        return self.step_no >= self.total

    @property
    def seconds(self) -> float:
        """Training seconds so far, earlier attempts included."""
        return self.earlier_s + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)

    def step(self) -> Step:
        """One optimizer step over `gradient_accumulation` micro-batches."""
        if self._t0 is None:
            self._t0 = time.perf_counter()
            self.model.train()
        spec, examples = self.spec, self.examples
        micro = [[examples[i] for i in next(self.batches)] for _ in range(spec.gradient_accumulation)]
        n_target = sum(sum(1 for x in e.labels[1:] if x != IGNORE) for b in micro for e in b)
        step_loss = 0.0
        for b in micro:
            batch = self.to_batch(b)
            loss_sum = token_losses(self.model, batch)[0].sum()
            (loss_sum / max(n_target, 1)).backward()
            step_loss += loss_sum.item()
            real, pads = batch_tokens(batch)
            self.seen += real
            self.padded += pads
        max_norm = spec.max_grad_norm if spec.max_grad_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        lr = self.sched.get_last_lr()[0]
        loss = step_loss / max(n_target, 1)
        elapsed = self.seconds
        self.step_no += 1
        for k, v in zip(CURVE, (self.step_no, loss, grad_norm, lr, self.seen, elapsed)):
            self.curve[k].append(v)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return Step(self.step_no, self.total, loss, grad_norm, lr, self.model, self.seen, elapsed, trainer=self)

    def state_dict(self) -> dict:
        """Everything the next steps depend on, as tensors and plain data (torch.save-able, and read
        back by torch.load(weights_only=True): no pickled code)."""
        return {"step": self.step_no, "total": self.total,
                "trainable": {n: p.detach().clone() for n, p in self.named},
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "data": self.batches.state_dict(), "rng": rng_state(),
                "curve": {k: list(v) for k, v in self.curve.items()}, "tokens": self.seen, "padding": self.padded,
                "seconds": self.seconds, "resumed_at": list(self.resumed_at)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (a state_dict of a trainer of the same run, same model and settings)."""
        names = [n for n, _ in self.named]
        if state["total"] != self.total or sorted(state["trainable"]) != sorted(names):
            raise ValueError(f"the saved training state is of another run ({len(state['trainable'])} trainable "
                             f"tensors, {state['total']} steps; this one: {len(names)}, {self.total})")
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(state["trainable"][n])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.curve = {k: list(state["curve"][k]) for k in CURVE}
        self.step_no, self.seen, self.padded = state["step"], state["tokens"], state["padding"]
        self.earlier_s = state["seconds"]
        self.resumed_at = [*state["resumed_at"], state["step"]]
        self._t0 = None

    def result(self, peak_mem_mb: float, stopped_by: "StepHook | None" = None, stop_reason: str | None = None
               ) -> TrainResult:
        wall = self.seconds
        seen, padded = self.seen, self.padded
        return TrainResult(steps=len(self.curve["step"]), curve=self.curve, stopped_by=stopped_by,
                           stop_reason=stop_reason, tokens=seen, wall_s=wall,
                           tokens_per_s=seen / wall if wall else 0.0, peak_mem_mb=peak_mem_mb,
                           trainable_params=self.trainable, total_params=self.total_params,
                           padding_share=padded / (seen + padded) if seen + padded else 0.0,
                           resumed_at=list(self.resumed_at))


def train_lora(model, examples: Sequence[Encoded], spec: TrainSpec, *, pad_id: int,
               hooks: Sequence[StepHook] = (), loraplus_lr_ratio: float | None = None,
               state: dict | None = None) -> TrainResult:
    """Train the trainable (LoRA) parameters of `model` in place (a Trainer, run to its planned steps).

    After every optimizer step each hook sees the step (in order); the first that names a reason to
    stop ends training there (a diverged loss, a pruned sweep trial): TrainResult says which and why.
    A stopped run's adapter is never stored, so an update made from a non-finite loss does no harm.
    `loraplus_lr_ratio`: LoRA+, B's learning rate that many times A's (PEFT's LoRA+ optimizer).
    `state`: a Trainer.state_dict() of this run to continue from (a checkpoint)."""
    trainer = Trainer(model, examples, spec, pad_id=pad_id, loraplus_lr_ratio=loraplus_lr_ratio)
    if state is not None:
        trainer.load_state_dict(state)
    stopped_by, stop_reason = None, None
    with PeakMemory(trainer.device) as mem:
        while not trainer.done:
            done = trainer.step()
            for hook in hooks:
                stop_reason = hook.after_step(done)
                if stop_reason:
                    stopped_by = hook
                    break
            if stopped_by is not None:
                break
    model.eval()
    return trainer.result(mem.mb, stopped_by, stop_reason)


@torch.inference_mode()
def eval_losses(model, examples: Sequence[Encoded], *, pad_id: int, batch_size: int = 8
                ) -> tuple[float, list[float], list[int]]:
    """Held-out cross-entropy under teacher forcing: the token-weighted mean, each example's own mean
    (for paired comparisons between runs on the same examples) and each example's scored tokens (so a
    comparison weighs examples as the token-weighted mean does)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    per_example = [float("nan")] * len(examples)
    tokens = [0] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # less padding
    to_batch = Batcher(model, pad_id, device)
    with eval_mode(model):
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            sums, counts = token_losses(model, to_batch([examples[j] for j in idx]))
            for j, s_, n in zip(idx, sums.tolist(), counts.tolist()):
                per_example[j] = s_ / n if n else float("nan")
                tokens[j] = int(n)
                total += s_
                count += n
    return (total / count if count else float("nan")), per_example, tokens


def eval_loss(model, examples: Sequence[Encoded], *, pad_id: int, batch_size: int = 8) -> float:
    """Mean cross-entropy per response token on held-out examples (teacher forcing)."""
    return eval_losses(model, examples, pad_id=pad_id, batch_size=batch_size)[0]
