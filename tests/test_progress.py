"""Overall progress lines ("run 3 of 6 (...), ETA") and ETAs from the recent rate of a phase."""

from __future__ import annotations

import math

from rich.console import Console

from loralab.progress import Overall, Reporter, recent_eta


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lines(console: Console) -> list[str]:
    return console.export_text().splitlines()


def test_the_overall_line_numbers_the_jobs_and_extrapolates_the_measured_mean():
    console, clock = Console(record=True, width=200, force_terminal=False), Clock()
    overall = Overall(Reporter(console), "run", 4, clock=clock)
    s = overall.start("A (seed 0)")
    clock.now = 30.0
    overall.finish(s)
    s = overall.start("A (seed 1)")
    clock.now = 40.0  # reused from the workspace: takes no time, and no part of the mean
    overall.finish(s, reused=True)
    s = overall.start("B (seed 0)")
    clock.now = 130.0
    overall.finish(s)  # 90 s: mean of the trained ones (30, 90) is 60 s
    overall.start("B (seed 1)")
    assert lines(console) == ["run 1 of 4 (A (seed 0))",
                              "run 2 of 4 (A (seed 1)), 1 done in 0:00:30, ETA 2 min",  # 30 s x 3 left (90 s)
                              "run 3 of 4 (B (seed 0)), 2 done in 0:00:40, ETA 60 s",  # 30 s x 2 left
                              "run 4 of 4 (B (seed 1)), 3 done in 0:02:10, ETA 60 s"]  # 60 s x 1 left


def test_no_total_no_eta():
    console = Console(record=True, width=200)
    overall = Overall(Reporter(console), "trial", None, clock=Clock())
    overall.finish(overall.start("x"))
    overall.start("y")
    assert lines(console) == ["trial 1 (x)", "trial 2 (y), 1 done in 0:00:00"]


def test_an_eta_follows_the_recent_rate_when_the_work_slows_down():
    # 10 items a second for 100 s, then 2 a second for the last 60 s (another process took the CPU)
    marks = [(0.0, 0), (100.0, 1000)]
    eta = recent_eta(marks, 160.0, 1120, 2000, window=60.0)
    assert eta == (2000 - 1120) / 2.0  # the last minute's rate, not the average since the start (7 a second)
    assert recent_eta([(0.0, 0)], 10.0, 5, 10, window=60.0) == 10.0  # younger than the window: since the start
    assert math.isnan(recent_eta([(0.0, 0)], 10.0, 0, 10))  # nothing done yet: no rate
