"""The report's pictures as SVG text: loss curves, quality against cost with its Pareto front, tokens
generated per cap, and one forest plot per headline effect.

SVG because it is text: the HTML report inlines it (one file, no network) and the Markdown report
links the same files. Text stays text (`svg.fonttype: none`), so the page's own font draws it, and
inlined figures get their ids prefixed, so several SVGs on one page never share an element id.
matplotlib is imported inside the functions: `loralab --help` must not pay for it.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from loralab.workspace.status import Status

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#bcbd22"]
BASE_COLOR = "#7f7f7f"
VERDICT_COLORS = {"better": "#2e7d32", "worse": "#c62828", "changed": "#1f5fa8", "noise": "#8a8a8a"}


@dataclass
class Plot:
    """One figure: a file name for the Markdown report, a caption, and its SVG text."""

    name: str  # file stem: plots/<name>.svg
    title: str
    caption: str
    svg: str  # a complete SVG document

    @property
    def inline(self) -> str:
        """The SVG for embedding in HTML: no XML prolog, DOCTYPE or metadata; scales with the page;
        every id prefixed with the figure's name (matplotlib numbers them from 1 in every figure)."""
        return inline_svg(self.svg, self.name)


def inline_svg(svg: str, prefix: str) -> str:
    text = re.sub(r"<\?xml[^>]*\?>\s*", "", svg)
    text = re.sub(r"<!DOCTYPE[^>]*>\s*", "", text)
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
    text = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}-{m.group(1)}"', text)
    text = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}-{m.group(1)})", text)
    text = re.sub(r'\b((?:xlink:)?href)="#([^"]+)"', lambda m: f'{m.group(1)}="#{prefix}-{m.group(2)}"', text)
    # Fixed pt sizes would overflow a narrow page; the viewBox keeps the aspect ratio.
    return re.sub(r'<svg([^>]*?) width="[^"]+" height="[^"]+"', r'<svg\1 class="plot" role="img"', text, count=1)


def pareto_front(points: Sequence[tuple[float, float]], better: str = "lower",
                 beats: Callable[[int, int], bool] | None = None) -> list[int]:
    """Indices of the points no other point beats. By default j beats i when it is cheaper or as cheap
    (x, lower is better) and better or as good on quality (y, `better` says which way), strictly better
    in one; `beats(j, i)` replaces that rule (the report's: by the noise rule). Sorted by x. Points with
    a NaN coordinate are never on the front."""
    sign = 1.0 if better == "lower" else -1.0
    pts = [(i, x, sign * y) for i, (x, y) in enumerate(points) if not (math.isnan(x) or math.isnan(y))]
    front = []
    for i, x, y in pts:
        dominated = any(beats(j, i) if beats is not None else (x2 <= x and y2 <= y) and (x2 < x or y2 < y)
                        for j, x2, y2 in pts if j != i)
        if not dominated:
            front.append((x, y, i))
    return [i for _, _, i in sorted(front)]


def _tex_safe(text: str) -> str:
    """matplotlib reads $...$ as math; a run name or knob value is plain text."""
    return str(text).replace("$", r"\$")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig


def _rc(salt: str) -> dict:
    return {"svg.fonttype": "none", "svg.hashsalt": salt, "font.family": "sans-serif", "font.size": 9,
            "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
            "legend.frameon": False}


def _render(fig, salt: str) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context(_rc(salt)):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()


def _plot(name: str, title: str, caption: str, draw, size: tuple[float, float] = (7.0, 3.6)) -> Plot:
    import matplotlib

    with matplotlib.rc_context(_rc(name)):
        fig = _figure(*size)
        draw(fig)
        return Plot(name, title, caption, _render(fig, name))


def palette(names: list[str]) -> dict[str, str]:
    """One color per run for every figure of a report, so A is the same color everywhere; base is grey."""
    trained = [n for n in dict.fromkeys(names) if n != "base"]
    return {"base": BASE_COLOR, **{n: PALETTE[i % len(PALETTE)] for i, n in enumerate(trained)}}


def color_for(i: int, name: str, colors: dict[str, str] | None = None) -> str:
    if colors and name in colors:
        return colors[name]
    return BASE_COLOR if name == "base" else PALETTE[i % len(PALETTE)]


# ---------------------------------------------------------------------------------------------
# The figures


@dataclass
class Curve:
    name: str
    steps: list[float]
    mean: list[float]  # mean over seeds at each step
    lo: list[float] | None = None  # min and max over seeds (a band), None for one seed
    hi: list[float] | None = None
    status: str = Status.FINISHED


def loss_curves(curves: list[Curve], colors: dict[str, str] | None = None) -> Plot:
    from loralab.metrics.stability import smooth

    def draw(fig):
        ax = fig.add_subplot()
        for i, c in enumerate(curves):
            col = color_for(i, c.name, colors)
            finite = [(s, m) for s, m in zip(c.steps, c.mean) if math.isfinite(m)]
            if not finite:
                continue
            xs, ys = zip(*finite)
            ax.plot(xs, ys, color=col, alpha=0.18 if len(curves) > 3 else 0.3, linewidth=0.7)
            label = c.name if c.status == Status.FINISHED else f"{c.name} ({c.status})"
            ax.plot(xs, smooth(ys), color=col, linewidth=1.8, label=_tex_safe(label),
                    linestyle="-" if c.status == Status.FINISHED else "--")
            if c.lo and c.hi and len(curves) <= 3:  # more bands than that overlap into one grey area
                ax.fill_between(c.steps, c.lo, c.hi, color=col, alpha=0.12, linewidth=0)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        if curves:
            ax.legend(loc="upper right", ncols=2 if len(curves) > 6 else 1, fontsize=8)

    return _plot("loss-curves", "Loss curves", "Training loss per step: faint, the mean over seeds; bold, smoothed "
                 "(debiased moving average); shaded (up to three runs), the range across seeds.", draw)


@dataclass
class Point:
    name: str
    x: float  # cost per run
    y: float  # quality
    x_err: float = 0.0  # CI half-widths (0: none)
    y_err: float = 0.0
    status: str = Status.FINISHED


def quality_vs_cost(points: list[Point], quality: str, cost: str, better: str, level: float = 0.95,
                    colors: dict[str, str] | None = None, beats: Callable[[int, int], bool] | None = None) -> Plot:
    front = pareto_front([(p.x, p.y) for p in points], better, beats)

    def draw(fig):
        ax = fig.add_subplot()
        for i, p in enumerate(points):
            col = color_for(i, p.name, colors)
            # A cost is never below 0: an interval reaching past it is drawn to 0 (its upper half as is).
            ax.errorbar([p.x], [p.y], xerr=[[min(p.x_err, max(p.x, 0.0))], [p.x_err]] if p.x_err else None,
                        yerr=[[p.y_err], [p.y_err]] if p.y_err else None, fmt="o", color=col, capsize=3,
                        markersize=6 if i in front else 4, alpha=1.0 if p.status == Status.FINISHED else 0.5)
            ax.annotate(_tex_safe(p.name), (p.x, p.y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if front:
            ax.plot([points[i].x for i in front], [points[i].y for i in front], color="#333333", linewidth=1,
                    linestyle=":", label="Pareto front")
            ax.legend(loc="best")
        ax.set_xlabel(_tex_safe(cost))
        ax.set_ylabel(_tex_safe(f"{quality} ({better} is better)"))
        ax.set_xlim(left=0)  # time and money per run: an axis below 0 would show costs no run can have

    return _plot("quality-vs-cost", "Quality against cost",
                 f"Each finished run: {quality} against its cost per run, with {level:.0%} intervals over seeds and eval examples (as the tables' cells). "
                 "The dotted line joins the Pareto front: runs no other run beats"
                 + (" (beating: better on quality or cost with an interval that excludes zero, and not worse on the "
                    "other)." if beats is not None else " on both."), draw)


@dataclass
class CapSeries:
    name: str
    caps: list[int]
    mean: list[float]
    err: list[float]  # CI half-widths (0: one seed)


def tokens_per_cap(series: list[CapSeries], colors: dict[str, str] | None = None) -> Plot:
    def draw(fig):
        ax = fig.add_subplot()
        caps = sorted({c for s in series for c in s.caps})
        for i, s in enumerate(series):
            ax.errorbar(s.caps, s.mean, yerr=s.err if any(s.err) else None, marker="o", capsize=3,
                        color=color_for(i, s.name, colors), label=_tex_safe(s.name))
        if caps:
            ax.plot(caps, caps, color="#999999", linestyle=":", linewidth=1, label="the cap")
        ax.set_xticks(caps)
        ax.set_xlabel("max_new_tokens (cap)")
        ax.set_ylabel("mean generated tokens")
        ax.legend(loc="upper left", fontsize=8)

    return _plot("tokens-per-cap", "Tokens generated per cap",
                 "Mean tokens generated on the eval prompts at each cap (one greedy generation, cut at each cap), "
                 "with intervals over seeds and eval examples. A run on the dotted line fills every cap: it rarely stops on its own.",
                 draw, size=(6.0, 3.4))


@dataclass
class Bar:
    label: str  # "train.learning_rate 0.0002 → 0.0005"
    diff: float
    lo: float
    hi: float
    verdict: str  # better / worse / changed (no good direction) / noise


def effect_forest(name: str, metric_label: str, bars: list[Bar], better: str | None) -> Plot:
    def draw(fig):
        ax = fig.add_subplot()
        ys = list(range(len(bars)))[::-1]
        for y, b in zip(ys, bars):
            col = VERDICT_COLORS.get(b.verdict, "#333333")
            has_ci = not (math.isnan(b.lo) or math.isnan(b.hi))
            ax.errorbar([b.diff], [y], xerr=[[b.diff - b.lo], [b.hi - b.diff]] if has_ci else None, fmt="o",
                        color=col, capsize=3)
        from matplotlib.ticker import MaxNLocator

        ax.axvline(0, color="#333333", linewidth=0.8)
        ax.set_yticks(ys, [_tex_safe(b.label) for b in bars])
        ax.set_ylim(-0.7, len(bars) - 0.3)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.set_xlabel("change" + (f" ({better} is better)" if better else ""))
        ax.grid(axis="y", visible=False)

    height = 1.1 + 0.32 * max(1, len(bars))
    return _plot(f"effect-{name}", f"Effects on {metric_label}",
                 f"Each knob's effect on {metric_label}, with its interval; green: better, red: worse, blue: "
                 "changed (no better direction), grey: within noise (the interval contains zero).", draw,
                 size=(5.6, height))
