"""Issue 7's numbers: training throughput against this machine's limit (P2: loralab's loop packed and
padded, a plain loop, and the ceiling its matrix products alone allow), batched generation against
a one-prompt-at-a-time loop (P3), and start-up times with the libraries' import floor (P4). Run by
hand, not in CI:

    .venv/bin/python benchmarks/perf.py all        # or: train | generate | startup
    REPEATS=5 .venv/bin/python benchmarks/perf.py train

Each figure is the median of REPEATS (default 3) measurements; every line printed is JSON.
Runs on CUDA when present (fp32/bf16 chosen as loralab chooses); the GPU check is
benchmarks/gpu_throughput.sh.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPEATS = int(os.environ.get("REPEATS", 3))
DATA = {"builtin": "stdlib-docstrings", "train_size": 128, "eval_size": 32}



def matmul_flops(n: int = 1024, repeats: int = 5, dtype=None, device: str = "cpu") -> float:
    """This machine's matmul rate (FLOP/s; fp32 unless `dtype`), the ceiling for training throughput."""
    import time

    import torch

    a = torch.randn(n, n, dtype=dtype or torch.float32, device=device)
    b = torch.randn(n, n, dtype=dtype or torch.float32, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b  # warm-up
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - t0)

def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def setup(device: str = "auto"):
    from loralab.engine.data import encode_example, load_data
    from loralab.engine.models import load_base_model
    from loralab.config.schema import DataSpec, ModelSpec

    base = load_base_model(ModelSpec(name="builtin:smollm2-135m"), Path.cwd(), device=device, log=lambda s: None)
    ds = load_data(DataSpec(**DATA), Path.cwd())
    enc = lambda exs: [encode_example(base.tokenizer, e, ds.system_prompt, 512) for e in exs]  # noqa: E731
    return base, ds, enc(ds.train), enc(ds.eval)


def shape_flops(model, rows: int, dtype, device: str, repeats: int = 5) -> float:
    """The matmul rate on this model's own shapes at `rows` tokens per step (each Linear forward, and
    its input-gradient product in backward): what GEMM achieves here for batches this small."""
    import torch

    shapes = {}
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            shapes[(mod.in_features, mod.out_features)] = shapes.get((mod.in_features, mod.out_features), 0) + 1
    flops = seconds = 0.0
    for (fan_in, fan_out), count in shapes.items():
        w = torch.randn(fan_out, fan_in, dtype=dtype, device=device)
        x, g = torch.randn(rows, fan_in, dtype=dtype, device=device), torch.randn(rows, fan_out, dtype=dtype, device=device)
        x @ w.T, g @ w
        t0 = time.perf_counter()
        for _ in range(repeats):
            x @ w.T  # forward
            g @ w  # backward, gradient of the input (the frozen weight gets none)
        if device != "cpu":
            torch.cuda.synchronize()
        seconds += (time.perf_counter() - t0) * count
        flops += 2 * 2 * rows * fan_in * fan_out * repeats * count
    return flops / seconds


def plain_loop_tokens_per_s(model, train, pad_id: int, steps: int) -> float:
    """The loop most people write: labels into the model (logits at every position), AdamW."""
    import torch

    from loralab.engine.train import collate

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    model.train()
    seen, t0 = 0, None
    for step in range(steps):
        if step == 4:  # warm-up steps excluded, as for loralab's loop below
            seen, t0 = 0, time.perf_counter()
        batch = collate(train[2 * step: 2 * step + 2], pad_id, next(model.parameters()).device)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += int(batch["attention_mask"].sum())
    model.eval()
    return seen / (time.perf_counter() - t0)


def bench_train() -> None:
    """P2: the seed's run A (r 4, alpha 8, dropout 0.05, q/k/v, batch 2) for one epoch of 128 examples."""
    import torch
    from peft import LoraConfig, get_peft_model


    base, ds, train, _ = setup()
    dev = base.device
    flops = statistics.median(max(matmul_flops(n, 10, base.dtype, dev.type) for n in (1024, 2048)) for _ in range(REPEATS))
    n_params = base.info["params"]
    limit = flops / (4 * n_params)  # tokens/s if every FLOP of a frozen-base step ran at the matmul rate
    steps = len(train) // 2
    ours, unpacked, plain, padding = [], [], [], []
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj"])
    for rep in range(REPEATS):  # the three loops interleaved, so each repeat sees the machine alike
        tps, share = loralab_tokens_per_s(base, train, cfg, rep, steps)
        ours.append(tps)
        padding.append(share)
        unpacked.append(loralab_tokens_per_s(base, train, cfg, rep, steps, pack=False)[0])
        model = get_peft_model(base.model, cfg)
        plain.append(plain_loop_tokens_per_s(model, train, base.tokenizer.pad_token_id, min(steps, 40)))
        base.model = model.unload()
        emit(bench="P2-repeat", repeat=rep, loralab_tokens_per_s=round(ours[-1], 1),
             loralab_padded_tokens_per_s=round(unpacked[-1], 1), plain_tokens_per_s=round(plain[-1], 1))
    gemm = gemm_bound(base, train, cfg)
    tps, ptps = statistics.median(ours), statistics.median(plain)
    rows = round(2 * statistics.fmean(len(e.input_ids) for e in train))
    small = statistics.median(shape_flops(base.model, rows, base.dtype, dev.type) for _ in range(REPEATS))
    emit(bench="P2 training throughput", device=str(dev), dtype=base.info["dtype"], threads=torch.get_num_threads(),
         matmul_gflops=round(flops / 1e9, 1), params_m=round(n_params / 1e6, 1), limit_tokens_per_s=round(limit, 1),
         loralab_tokens_per_s=round(tps, 1), loralab_fraction_of_limit=round(tps / limit, 3),
         plain_loop_tokens_per_s=round(ptps, 1), plain_fraction_of_limit=round(ptps / limit, 3),
         padding_share=round(statistics.median(padding), 4), repeats=REPEATS,
         loralab_padded_tokens_per_s=round(statistics.median(unpacked), 1),
         padded_padding_share=round(padding_share(train, steps), 4),
         rows_per_step=rows, matmul_gflops_at_model_shapes=round(small / 1e9, 1),
         limit_at_model_shapes_tokens_per_s=round(small / (4 * n_params), 1),
         loralab_fraction_of_shape_limit=round(tps / (small / (4 * n_params)), 3),
         gemm_share_of_step=round(gemm["share"], 3), gemm_only_tokens_per_s=round(gemm["tokens_per_s"], 1),
         gemm_only_fraction_of_limit=round(gemm["tokens_per_s"] / limit, 3))


def train_run_a(base, train, cfg, seed: int, steps: int, pack: bool = True):
    """loralab's loop on the seed's run A, the base model restored after; pack=False forces
    right-padded batches, to measure what packing gains."""
    from unittest import mock

    import torch
    from peft import get_peft_model

    from loralab.engine import train as loop
    from loralab.config.schema import TrainSpec

    torch.manual_seed(seed)
    model = get_peft_model(base.model, cfg)
    with mock.patch.object(loop.Batcher, "packs", lambda self, lengths: False) if not pack else contextlib.nullcontext():
        res = loop.train_lora(model, train, TrainSpec(learning_rate=2e-4, batch_size=2, max_steps=steps, seed=seed),
                              pad_id=base.tokenizer.pad_token_id)
    base.model = model.unload()
    return res


def loralab_tokens_per_s(base, train, cfg, seed: int, steps: int, pack: bool = True) -> tuple[float, float]:
    """Steady-state tokens/s (from step 5) of `train_run_a`, and its padding share."""
    res = train_run_a(base, train, cfg, seed, steps, pack)
    c = res.curve
    return (c["tokens"][-1] - c["tokens"][3]) / (c["seconds"][-1] - c["seconds"][3]), res.padding_share


def padding_share(train, steps: int) -> float:
    """The padding right-padded batches of the seed's order would carry (what packing removes)."""
    from loralab.config.schema import TrainSpec
    from loralab.engine.train import micro_batches

    batches = micro_batches(len(train), TrainSpec(batch_size=2))
    real = pad = 0
    for _ in range(steps):
        lengths = [len(train[i].input_ids) for i in next(batches)]
        real += sum(lengths)
        pad += len(lengths) * max(lengths) - sum(lengths)
    return pad / (real + pad)


def gemm_bound(base, train, cfg, steps: int = 16) -> dict:
    """The ceiling of loralab's loop as it runs here: tokens/s if the matrix products (their own
    time, from the profiler) were all a step did and everything else cost nothing."""
    from torch.profiler import ProfilerActivity, profile

    if base.device.type != "cpu":  # CPU only: on a GPU the products' time is a kernel timeline question
        return {"share": float("nan"), "tokens_per_s": float("nan")}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        res = train_run_a(base, train, cfg, seed=0, steps=steps)
    events = prof.key_averages()
    gemm_us = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"))
    total_us = sum(e.self_cpu_time_total for e in events)
    return {"share": gemm_us / total_us, "tokens_per_s": res.tokens / (gemm_us / 1e6)}


def bench_generate() -> None:
    """P3: greedy generation of the 32 eval answers at cap 64, batched (loralab) vs one prompt at a time."""
    import torch

    from loralab.engine.data import end_token_id
    from loralab.engine.generate import generate_greedy

    base, ds, _, evals = setup()
    tok, model = base.tokenizer, base.model
    prompts = [e.input_ids[: e.prompt_len] for e in evals]
    end = end_token_id(tok)
    kw = dict(eos_token_ids=[end], pad_token_id=tok.pad_token_id)
    batched, single = [], []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        gens = generate_greedy(model, prompts, 64, batch_size=16, **kw)
        batched.append((sum(len(g.tokens) for g in gens), time.perf_counter() - t0))
        t0 = time.perf_counter()
        n = 0
        with torch.inference_mode():
            for p in prompts:  # the plain way: model.generate per prompt
                out = model.generate(torch.tensor([p], device=base.device), max_new_tokens=64, do_sample=False,
                                     eos_token_id=end, pad_token_id=tok.pad_token_id)
                n += out.shape[1] - len(p) - int(out[0, -1].item() == end)
        single.append((n, time.perf_counter() - t0))
    rate = lambda xs: statistics.median(t / s for t, s in xs)  # noqa: E731
    emit(bench="P3 generation", prompts=len(prompts), cap=64, batch_size=16,
         batched_tokens=batched[0][0], batched_s=round(statistics.median(s for _, s in batched), 2),
         batched_tokens_per_s=round(rate(batched), 1), one_at_a_time_tokens=single[0][0],
         one_at_a_time_s=round(statistics.median(s for _, s in single), 2),
         one_at_a_time_tokens_per_s=round(rate(single), 1), speedup=round(rate(batched) / rate(single), 2),
         repeats=REPEATS)


# Each snippet runs in a fresh process, timed from its first import (`inner` adds the timing).
MODEL_READY = """
from pathlib import Path
from loralab.engine.models import load_base_model
from loralab.config.schema import ModelSpec
b = load_base_model(ModelSpec(name="builtin:smollm2-135m"), Path.cwd(), log=lambda s: None)
"""
IMPORT_TORCH = "import torch"
# What transformers 5 imports for any of its models: the modeling stack pulls in torch._dynamo
# (masking_utils) and torch.distributed.tensor (sharding utilities) unconditionally.
LLAMA_STACK = "from transformers import LlamaForCausalLM\nLlamaForCausalLM.__mro__"


def bench_startup() -> None:
    """P4: wall time of whole processes, as a user sees them (the cached built-in model)."""
    exe = [sys.executable, "-m", "loralab.cli"]
    seed = str(Path(__file__).resolve().parent.parent / "examples" / "seed-report.yaml")
    subprocess.run(exe + ["validate", seed], check=True, capture_output=True)  # records the model's layers once

    def wall(cmd: list[str]) -> float:
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        return time.perf_counter() - t0

    def inner(code: str) -> float:
        timed = f"import time\nt0 = time.perf_counter()\n{code}\nprint(time.perf_counter() - t0)"
        return float(subprocess.run([sys.executable, "-c", timed], check=True, capture_output=True,
                                    text=True).stdout.strip().splitlines()[-1])

    runs = max(REPEATS, 5)
    emit(bench="P4 start-up", repeats=runs,
         help_s=round(statistics.median(wall(exe + ["--help"]) for _ in range(runs)), 3),
         validate_s=round(statistics.median(wall(exe + ["validate", seed]) for _ in range(runs)), 3),
         model_ready_s=round(statistics.median(inner(MODEL_READY) for _ in range(runs)), 2),
         # The floor under model_ready: importing the libraries alone, before loralab does anything.
         import_torch_s=round(statistics.median(inner(IMPORT_TORCH) for _ in range(runs)), 2),
         import_llama_stack_s=round(statistics.median(inner(LLAMA_STACK) for _ in range(runs)), 2),
         python_bare_s=round(statistics.median(wall([sys.executable, "-c", "pass"]) for _ in range(runs)), 3))


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    emit(machine=platform.machine(), cpus=os.cpu_count(), python=platform.python_version(),
         date=time.strftime("%Y-%m-%d"))
    for name, fn in (("startup", bench_startup), ("train", bench_train), ("generate", bench_generate)):
        if what in (name, "all"):
            fn()


if __name__ == "__main__":
    main()
