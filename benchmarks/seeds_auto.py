"""Seeds trained by `repeats: auto` against fixed `repeats: 3` and `repeats: 5`, for the false-call rate and
power each gets, on simulated seeds x eval examples with a known effect (tests/execute/sim_seeds.py).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/seeds_auto.py [--reps 2000]

Prints a Markdown table: per effect size (in units of the seed noise), the share of pairs called
`higher` (power; at effect 0 the false-call rate) and the mean seeds per run, for auto (min 2, max 5)
and for 3 and 5 fixed seeds. Both runs of a pair are planned together, as the planner does.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "execute"))

from sim_seeds import Design, fixed_trial, sequential_trial  # noqa: E402

from loralab.config.schema import SequentialSpec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2000)
    args = ap.parse_args()
    d = Design()
    plan = SequentialSpec(min_seeds=2, max_seeds=5)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    print(f"Design: {d}; plan min {plan.min_seeds}, max {plan.max_seeds}; {args.reps} pairs per cell\n")
    print("| effect (B - A) | auto: called | auto: seeds/run | 3 seeds: called | 5 seeds: called |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for effect in (0.0, 0.04, 0.06, 0.1, 0.2, 0.5):
        auto = [sequential_trial(rng, d, plan, effect) for _ in range(args.reps)]
        wrong = "higher" if effect > 0 else ("higher", "lower")
        called = np.mean([lab in wrong if effect == 0 else lab == "higher" for lab, _ in auto])
        seeds = np.mean([k for _, k in auto])
        f3 = np.mean([(lab in ("higher", "lower")) if effect == 0 else lab == "higher"
                      for lab in (fixed_trial(rng, d, 3, effect) for _ in range(args.reps))])
        f5 = np.mean([(lab in ("higher", "lower")) if effect == 0 else lab == "higher"
                      for lab in (fixed_trial(rng, d, 5, effect) for _ in range(args.reps))])
        print(f"| {effect:g} | {called:.1%} | {seeds:.2f} | {f3:.1%} | {f5:.1%} |")
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
