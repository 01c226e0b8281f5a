"""The report's figures: the Pareto front by hand, and SVGs that inline safely (text as text, no
network, no id shared between two figures on one page)."""

import math
import re

import pytest

from loralab.report import plots as plots


@pytest.mark.parametrize("points, better, front", [
    # (cost, quality): lower loss is better. (3, 1.0) is beaten by nothing; (2, 2.0) is dominated by (1, 2.0).
    ([(1, 2.0), (2, 2.0), (3, 1.0), (4, 1.5)], "lower", [0, 2]),
    # Higher ROUGE is better: the cheapest point and each strictly better, dearer one.
    ([(1, 0.30), (2, 0.35), (3, 0.34), (5, 0.40)], "higher", [0, 1, 3]),
    # Equal points do not dominate each other: both stay.
    ([(1, 1.0), (1, 1.0)], "lower", [0, 1]),
    # A NaN coordinate is never on the front and beats nothing.
    ([(1, math.nan), (2, 1.0), (math.nan, 0.5)], "lower", [1]),
    ([], "lower", []),
])
def test_pareto_front(points, better, front):
    assert plots.pareto_front(points, better) == front


def _ids(svg: str) -> set[str]:
    return set(re.findall(r'\bid="([^"]+)"', svg))


def test_figures_keep_text_as_text_and_inline_safely():
    curves = [plots.Curve("A", [1, 2, 3], [3.0, 2.5, 2.2], [2.9, 2.4, 2.1], [3.1, 2.6, 2.3]),
              plots.Curve("B$x$", [1, 2, 3], [3.0, 2.0, 1.9], status="diverged")]  # "$" must not start math
    p1 = plots.loss_curves(curves)
    p2 = plots.quality_vs_cost([plots.Point("A", 10, 2.2, 1, 0.1), plots.Point("B", 20, 1.9, 2, 0.1)],
                               "eval loss", "time per run (s)", "lower")
    assert ">A</text>" in p1.svg and "B$x$ (diverged)" in p1.svg  # svg.fonttype none: labels are <text>
    for p in (p1, p2):
        inline = p.inline
        assert inline.startswith("<svg") and 'class="plot"' in inline and "viewBox" in inline
        assert "<!DOCTYPE" not in inline and "<metadata" not in inline and "<?xml" not in inline
        assert not re.search(r'(href|src)="https?:', inline)  # nothing to fetch
    assert _ids(p1.inline) and not (_ids(p1.inline) & _ids(p2.inline))  # two figures on one page share no id
    for p in (p1, p2):  # and every reference inside a figure still points into it
        refs = set(re.findall(r"url\(#([^)]+)\)", p.inline)) | set(re.findall(r'href="#([^"]+)"', p.inline))
        assert refs and refs <= _ids(p.inline)
    assert "Pareto front" in p2.svg


def test_effect_forest_and_tokens_per_cap():
    bars = [plots.Bar("train.learning_rate 0.0002 → 0.0005", -0.3, -0.35, -0.25, "better"),
            plots.Bar("lora.dropout 0.05 → 0.1", 0.01, math.nan, math.nan, "noise")]  # no interval: a dot
    f = plots.effect_forest("eval-loss", "eval loss", bars, "lower")
    assert f.name == "effect-eval-loss" and "lora.dropout 0.05 → 0.1" in f.svg and "(lower is better)" in f.svg
    t = plots.tokens_per_cap([plots.CapSeries("A", [50, 100], [30.0, 42.0], [2.0, 3.0])])
    assert "max_new_tokens (cap)" in t.svg and "the cap" in t.svg


def test_a_run_keeps_its_color_in_every_figure():
    colors = plots.palette(["base", "A", "B", "A"])
    assert colors == {"base": plots.BASE_COLOR, "A": plots.PALETTE[0], "B": plots.PALETTE[1]}
    curves = plots.loss_curves([plots.Curve("B", [1, 2], [2.0, 1.5])], colors)  # B alone still draws in B's color
    series = plots.tokens_per_cap([plots.CapSeries("base", [50, 100], [30.0, 40.0], [0, 0]),
                                   plots.CapSeries("B", [50, 100], [10.0, 12.0], [0, 0])], colors)
    for svg in (curves.svg, series.svg):
        assert f"stroke: {plots.PALETTE[1]}" in svg and f"stroke: {plots.PALETTE[0]}" not in svg


def test_the_cost_axis_never_goes_below_zero():
    """Seen: a time axis running below 0 s, drawn for a cost interval wider than the cost itself."""
    p = plots.quality_vs_cost([plots.Point("trial-0001", 2.5, 2.2, 30.0, 0.1), plots.Point("A", 38.6, 1.9, 3.0, 0.1)],
                              "eval loss", "time per run (s)", "lower")
    ticks = re.findall(r">([−-]?\d[\d.]*)</text>", p.svg)  # tick labels are text (svg.fonttype none)
    assert ticks and not any(t.startswith(("−", "-")) for t in ticks), ticks
