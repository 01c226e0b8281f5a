"""What comparison hands to metrics.stats beyond the rows: a share's bounds and the eval items' groups."""

from __future__ import annotations

import math

from loralab.analysis.comparison import cell_estimate, fmt_estimate, fmt_verdict, verdict_of
from loralab.workspace.store import RunRecord

N = 24


def record(name: str, seed: int, losses: list[float], *, groups: list[str] | None = None,
           exact: list[float] | None = None) -> RunRecord:
    samples = []
    for i, x in enumerate(losses):
        s = {"id": f"ex{i}", "loss": x, "loss_tokens": 4, "outputs": {}}
        if groups is not None:
            s["group"] = groups[i]
        if exact is not None:
            s["outputs"] = {"8": {"metrics": {"exact_match": exact[i]}}}
        samples.append(s)
    metrics = {"eval_loss": sum(losses) / len(losses)}
    if exact is not None:
        metrics["exact_match@8"] = sum(exact) / len(exact)
    return RunRecord(id=f"{name}-{seed}", name=name, experiment="x", kind="lora", status="finished", seed=seed,
                     config={"train": {"seed": seed}}, model={}, data={}, metrics=metrics, curves={}, samples=samples,
                     env={}, timings={}, adapter_path=None, error=None, created_at="", updated_at="")


def losses(seed: int, shift: float = 0.0) -> list[float]:
    # Four groups of six near-duplicates: the group decides most of an item's loss.
    return [2.0 + shift + [0.9, -0.4, 0.3, -0.8][i // 6] + 0.01 * math.sin(i + seed) for i in range(N)]


GROUPS = [f"doc{i // 6}" for i in range(N)]


def test_grouped_items_count_once_in_the_cell_and_the_verdict():
    grouped = [record("A", s, losses(s), groups=GROUPS) for s in (0, 1, 2)]
    plain = [record("A", s, losses(s)) for s in (0, 1, 2)]
    wide, narrow = cell_estimate("eval_loss", grouped, 0.95), cell_estimate("eval_loss", plain, 0.95)
    assert wide.mean == narrow.mean and wide.hi - wide.lo > 2 * (narrow.hi - narrow.lo)
    # A run whose per-group effects differ (+-0.2 by group): as four items, not 24, the shift is less sure.
    other = [record("B", s, [x + [0.2, -0.2, 0.2, -0.2][i // 6] for i, x in enumerate(losses(s, 0.1))],
                    groups=GROUPS) for s in (0, 1, 2)]
    other_plain = [record("B", s, [x + [0.2, -0.2, 0.2, -0.2][i // 6] for i, x in enumerate(losses(s, 0.1))])
                   for s in (0, 1, 2)]
    vg, vp = verdict_of("eval_loss", grouped, other, 0.95), verdict_of("eval_loss", plain, other_plain, 0.95)
    assert vg.diff == vp.diff and vg.hi - vg.lo > 2 * (vp.hi - vp.lo)


def test_a_share_of_zero_is_not_zero_plus_minus_zero():
    zero = [record("A", s, losses(s), exact=[0.0] * N) for s in (0, 1, 2)]
    e = cell_estimate("exact_match@8", zero, 0.95)
    assert e.mean == 0.0 and e.lo == 0.0 and 0.0 < e.hi < 0.25  # within [0, 1], and a width (was 0% +- 0%)
    assert fmt_estimate(e, "pct") != "0% ± 0%"
    some = [record("B", s, losses(s), exact=[1.0] * 3 + [0.0] * (N - 3)) for s in (0, 1, 2)]
    v = verdict_of("exact_match@8", zero, some, 0.95)
    assert -1.0 <= v.lo < v.diff < v.hi <= 1.0 and v.hi - v.lo > 0
    assert "pp [" in fmt_verdict(v, "pct")


def test_one_seed_runs_borrow_seed_noise_from_the_tables_runs_with_several_seeds():
    from loralab.analysis.comparison import compare

    def with_data(recs, fp="d1"):
        return [RunRecord(**{**r.__dict__, "model": {"fingerprint": "m"}, "data": {"fingerprint": fp}}) for r in recs]

    a = with_data([record("A", 0, losses(0))])
    b = with_data([record("B", 1, losses(1, -0.3))])
    c = compare([a, b])
    assert c.row("eval_loss").verdicts[0].label == "untested"  # one seed each, nothing to borrow
    # A third run of the same model and data with three seeds (seed sd about 0.01): its seed noise is lent.
    many = with_data([record("C", s, losses(s, 0.01 * s)) for s in (2, 3, 4)])
    v = compare([a, b, many]).row("eval_loss").verdicts[0]
    assert v.label == "lower" and "taken as that of other runs" in v.note and fmt_verdict(v, "f4").endswith(
        "(seed noise assumed)")
    # Another data set's runs lend nothing.
    other = with_data([record("C", s, losses(s, 0.01 * s)) for s in (2, 3, 4)], fp="d2")
    assert compare([a, b, other]).row("eval_loss").verdicts[0].label == "untested"
