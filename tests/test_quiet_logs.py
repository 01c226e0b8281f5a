"""A run's log holds loralab's lines, not library notices: bitsandbytes' kernel-hub notice (printed on
CPUs with AVX-512 BF16 whenever PEFT imports it) and transformers' FutureWarnings."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

NOISE = ("Failed to load CPU gemm_4bit_forward", "Skipping publisher trust check", "Warning:", "kernels-community")


def test_library_loggers_are_quiet_once_loralab_is_imported():
    """What decides the notice, on any CPU: the level its logger has after `import loralab`."""
    code = ("import logging, loralab; print(logging.getLogger('bitsandbytes.backends.cpu.ops').getEffectiveLevel(), "
            "logging.getLogger('kernels._internals.hf_hub').getEffectiveLevel())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert [int(x) for x in out.stdout.split()] == [logging.ERROR, logging.ERROR]


def test_a_run_piped_to_a_log_has_no_library_noise(tiny_llama, tmp_path):
    (tmp_path / "data.jsonl").write_text("".join(
        f'{{"q": "Define word{i}.", "a": "a small thing number {i}."}}\n' for i in range(12)))
    (tmp_path / "exp.yaml").write_text(
        f"name: quiet\nmodel: {tiny_llama}\ndata: {{path: data.jsonl, instruction_field: q, output_field: a}}\n"
        "runs:\n  A:\n    lora: {r: 2, target_modules: [q_proj]}\n    train: {max_steps: 2, batch_size: 2}\n"
        "    generate: {max_new_tokens: 2}\n")
    # Python's default warning filters, as a user's shell has them (FutureWarning shown); no network in
    # tests: offline, `kernels` logs a notice of its own, which must not show either
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONWARNINGS", None)
    res = subprocess.run([sys.executable, "-m", "loralab.cli", "run", "exp.yaml", "-w", "ws"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log
    assert "A: eval loss" in log
    # export --merge loads the adapter with PEFT, which calls a transformers API deprecated for v6
    res = subprocess.run([sys.executable, "-m", "loralab.cli", "export", "A", "--merge", "--out", "merged", "-w", "ws"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    log += res.stdout + res.stderr
    assert res.returncode == 0 and "Wrote merged" in log, log
    assert not [line for line in log.splitlines() if any(n in line for n in NOISE)], log
