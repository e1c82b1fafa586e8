"""The plots of `fse experiment`: ppl.png (windowed perplexity, the health bands) and
metrics.png (one panel per guard metric of the registry), with each policy's thresholds
and its halts marked. Needs matplotlib (imported on call)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fse.core.errors import InputError
from fse.core.registry import GUARDS, Plot
from fse.core.types import NON_FINITE
from fse.tools.experiment.report import ARMED_FROM
from fse.tools.experiment.suite import apply_override

if TYPE_CHECKING:
    from fse.core.policy import Policy
    from fse.tools.experiment.suite import Category, CellRun, Suite
    from fse.tools.runner import Run

HEALTH_GREEN = 200.0  # the report's health bands, shaded in ppl.png
HEALTH_RED = 400.0
DPI = 100


# Each guard's marker of its halts (the registry's), and non_finite's.
GUARD_MARKERS = {g.name.value: g.marker for g in GUARDS} | {NON_FINITE.value: "D"}
TRACE_COLOUR = "0.45"  # grey: the trajectories; colour belongs to the policies' halts


def ppl_figure_size(n_categories: int) -> tuple[int, int]:
    """Pixel size of ppl.png: up to two panels a row."""
    cols = min(2, n_categories)
    rows = -(-n_categories // cols)
    return 600 * cols, 300 * rows + 100


def _panels() -> list[tuple[str, Plot]]:
    """The columns of metrics.png: each guard of the registry that has a panel."""
    return [(g.name.value, g.plot) for g in GUARDS if g.plot is not None]


def metrics_figure_size(n_categories: int) -> tuple[int, int]:
    """Pixel size of metrics.png: one row per category, one panel per guard metric."""
    return 500 * len(_panels()), 240 * n_categories + 100


def _halt_y(
    c: CellRun, metric: str, guard: str, refs: dict[tuple[str, str, int | None], Run]
) -> float | None:
    """Where to mark a halt on a `metric` panel: the value that tripped the guard when it
    measures this metric, else the metric at the halting token in the unguarded run,
    else the last released value; None when nothing is known (marked on the x axis)."""
    run = c.run
    if run.guard == guard and run.value is not None and math.isfinite(run.value):
        return run.value
    ref = refs.get((c.category.name, run.prompt.text, run.seed))
    if ref is not None and run.token_index is not None and run.token_index < len(ref.steps):
        return float(getattr(ref.steps[run.token_index], metric))
    if run.steps:
        return float(getattr(run.steps[-1], metric))
    return None


def _save_png(fig: Any, path: Path) -> None:
    """Save as a 256-colour palette PNG (line art: half the bytes, no visible change);
    Pillow comes with matplotlib. Same pixel size as the figure."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    buf.seek(0)
    with Image.open(buf) as image:
        palette = image.convert("RGB").quantize(
            colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        )
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        palette.save(tmp, format="PNG", optimize=True)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"--out: {path}: cannot write: {exc.strerror or exc}") from None


def write_plots(
    cells: Sequence[CellRun],
    suite: Suite,
    policies: Sequence[Policy],
    out: Path,
    max_tokens: int | None,
) -> None:
    """ppl.png and metrics.png (see the module docstring)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    colour = {p.name: f"C{i % 10}" for i, p in enumerate(policies)}
    # Concentric markers: with the same seed, several policies often halt on the same token.
    size = {p.name: max(4.0, 14.0 - 4.0 * i) for i, p in enumerate(policies)}
    guarded = [c for c in cells if not c.reference]
    refs = {(c.category.name, c.run.prompt.text, c.run.seed): c.run for c in cells if c.reference}
    has_refs = bool(refs)
    guards_seen = sorted({c.run.guard for c in guarded if c.run.halted and c.run.guard})
    trace_label = "unguarded run (same prompt and seed)" if has_refs else "released tokens"
    legend = [Line2D([], [], color=TRACE_COLOUR, label=trace_label)]
    legend += [
        Line2D([], [], color=colour[p.name], marker="o", linestyle="none", label=f"policy {p.name}")
        for p in policies
    ]
    legend += [
        Line2D(
            [], [], color="white", markeredgecolor="black", marker=GUARD_MARKERS.get(g, "*"),
            linestyle="none", label=f"halt: {g}",
        )
        for g in guards_seen
    ]  # fmt: skip

    def draw(ax: Any, cat: Category, metric: str, guard: str) -> None:
        traces = [c for c in cells if c.category is cat and c.reference == has_refs]
        for c in traces:
            xs = [m.index for m in c.run.steps]
            ys = [float(getattr(m, metric)) for m in c.run.steps]
            if metric == "ppl":  # before the guard arms, the window holds a few tokens only
                ax.plot(xs[: ARMED_FROM + 1], ys[: ARMED_FROM + 1], color=TRACE_COLOUR,
                        linewidth=0.8, alpha=0.25, linestyle=":")  # fmt: skip
                xs, ys = xs[ARMED_FROM:], ys[ARMED_FROM:]
            ax.plot(xs, ys, color=TRACE_COLOUR, linewidth=0.8, alpha=0.55)
        for c in guarded:
            if c.category is not cat or not c.run.halted or c.run.token_index is None:
                continue
            kw: dict[str, Any] = {
                "color": colour[c.policy.name],
                "marker": GUARD_MARKERS.get(c.run.guard or "", "*"),
                "markersize": size[c.policy.name],
                "markeredgecolor": "black",
                "markeredgewidth": 0.6,
                "linestyle": "none",
                "zorder": 5,
            }
            y = _halt_y(c, metric, guard, refs)
            if y is None:
                ax.plot([c.run.token_index], [0.03], transform=ax.get_xaxis_transform(), **kw)
            else:
                ax.plot([c.run.token_index], [y], **kw)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlim(-1, (max_tokens or cat.max_tokens or suite.max_tokens) + 1)

    n = len(suite.categories)

    # ppl.png
    w, h = ppl_figure_size(n)
    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    cols = min(2, n)
    axes = fig.subplots(-(-n // cols), cols, squeeze=False, sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    ppl_values = [
        float(m.ppl) for c in cells for m in c.run.steps[ARMED_FROM:] if math.isfinite(m.ppl)
    ] + [c.run.value for c in guarded if c.run.guard == "perplexity" and c.run.value]
    for ax, cat in zip(axes.flat, suite.categories, strict=False):
        ax.set_yscale("log")
        ax.axhspan(1e-3, HEALTH_GREEN, color="tab:green", alpha=0.07, linewidth=0)
        ax.axhspan(HEALTH_GREEN, HEALTH_RED, color="gold", alpha=0.25, linewidth=0)
        ax.axhspan(HEALTH_RED, 1e30, color="tab:red", alpha=0.07, linewidth=0)
        for p in policies:
            eff = apply_override(p, cat.policy_override)
            if eff.perplexity is not None:
                ax.axhline(eff.perplexity.threshold, color=colour[p.name], linestyle="--", lw=0.9)
        draw(ax, cat, "ppl", "perplexity")
        ax.set_title(f"{cat.title} (expect {cat.expect})", fontsize=10)
        ax.set_xlabel("token")
        ax.set_ylabel("windowed perplexity")
    axes.flat[0].set_ylim(0.8, max([HEALTH_RED * 3, *ppl_values]) * 3)
    fig.suptitle(
        f"Windowed perplexity per token ({suite.name}): green < {HEALTH_GREEN:g}, "
        f"yellow {HEALTH_GREEN:g}\u2013{HEALTH_RED:g}, red > {HEALTH_RED:g}; dashed: each "
        "policy's threshold; markers: where a policy halted",
        fontsize=11,
    )
    fig.legend(handles=legend, loc="outside lower center", ncol=min(5, len(legend)), fontsize=9)
    _save_png(fig, out / "ppl.png")

    # metrics.png
    w, h = metrics_figure_size(n)
    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    panels = _panels()
    axes = fig.subplots(n, len(panels), squeeze=False)
    for r, cat in enumerate(suite.categories):
        for col, (guard, panel) in enumerate(panels):
            metric, label = panel.metric, panel.label
            ax = axes[r][col]
            ax.set_yscale(panel.scale)
            draw(ax, cat, metric, guard)
            configs = [
                (p, cfg)
                for p in policies
                if (cfg := getattr(apply_override(p, cat.policy_override), guard)) is not None
            ]
            if panel.probability:
                ax.set_ylim(0, 1.02)
            else:
                vals = [
                    float(getattr(m, metric))
                    for c in cells
                    if c.category is cat
                    for m in c.run.steps
                ]
                vals += [
                    c.run.value
                    for c in guarded
                    if c.category is cat and c.run.guard == guard and c.run.value
                ]
                vals += [cfg.threshold for _, cfg in configs]
                finite = [v for v in vals if v > 0 and math.isfinite(v)]
                if finite:
                    ax.set_ylim(min(finite) / 2, max(finite) * 2)
            for p, cfg in configs:
                ax.axhline(cfg.threshold, color=colour[p.name], linestyle="--", linewidth=1)
                if panel.halts_below:
                    ax.axhspan(1e-30, cfg.threshold, color="tab:red", alpha=0.06, linewidth=0)
                else:
                    ax.axhspan(cfg.threshold, 1e30, color="tab:red", alpha=0.06, linewidth=0)
            if r == 0:
                ax.set_title(label, fontsize=11)
            if col == 0:
                ax.set_ylabel(f"{cat.title}\n(expect {cat.expect})", fontsize=9)
            if r == n - 1:
                ax.set_xlabel("token")
    fig.suptitle(
        f"Logit statistics per token ({suite.name}); dashed: each policy's threshold, "
        "red: the halting side; markers: where a policy halted",
        fontsize=11,
    )
    fig.legend(handles=legend, loc="outside lower center", ncol=min(5, len(legend)), fontsize=9)
    _save_png(fig, out / "metrics.png")
