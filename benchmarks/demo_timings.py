"""Time `loralab demo` from an empty cache, then again with everything reused.

Run by hand (make bench), not in CI. Prints a Markdown section for BENCHMARKS.md:
    .venv/bin/python benchmarks/demo_timings.py
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import loralab


def timed_demo(env: dict, workspace: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "loralab.cli", "demo", "-w", str(workspace)], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "XDG_CACHE_HOME": str(Path(tmp) / "cache")}
        ws = Path(tmp) / "ws"
        first = timed_demo(env, ws)
        second = timed_demo(env, ws)
        convert = json.loads((Path(tmp) / "cache" / "loralab" / "models" / "smollm2-135m-instruct" / "loralab.json").read_text())
        runs = {r.name: r for r in loralab.list_runs(ws)}
    import torch

    print(f"## `loralab demo` ({dt.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    print("| step | seconds |\n| --- | ---: |")
    print(f"| first `loralab demo`, empty cache (conversion included) | {first:.0f} |")
    print(f"| GGUF -> safetensors conversion | {convert['convert_seconds']:.0f} |")
    for name in ("base", "A", "B"):
        r = runs[name]
        if name != "base":
            print(f"| run {name}: train {r.metrics['steps']} steps ({r.metrics['tokens_per_s']:.0f} tokens/s) | {r.metrics['train_s']:.0f} |")
        print(f"| run {name}: eval (loss + generation at cap {max(r.config['eval_caps'])}, "
              f"{r.timings['generate_tokens_per_s']:.0f} generated tokens/s) | {r.metrics['eval_s']:.0f} |")
    print(f"| second `loralab demo` (runs and model reused) | {second:.0f} |")


if __name__ == "__main__":
    main()
