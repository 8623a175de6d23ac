"""The PNG figures of projkd's results: learning curves, bars, the ablations' lines and the bench.

tables.py decides what each figure shows (its series: plain numbers from the runs' metrics, which
the tests check against log.csv) and calls these to draw it; this file only draws. It is the one
file that imports matplotlib, and only when a figure is drawn: a python without it (a GPU node's)
still imports everything else.
"""
import textwrap

from projkd import UserError, atomic_write

NO_RUNS = "no finished runs yet"
CURVE_LABELS = {
    "test_top1": "test top-1 (%)",
    "test_top5": "test top-5 (%)",
    "train_mda": "training MDA term",
}


def pyplot():
    """matplotlib's pyplot, headless; one line where this python has no matplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("figures need matplotlib, which this python lacks: "
                        "pip install -r requirements.txt") from None
    matplotlib.use("Agg")  # headless: a cluster node has no display
    import matplotlib.pyplot as plt
    return plt


def _panels(plt, n, title, width=4.8, stacked=False):
    """n panels side by side, or one above the other; at least one, to say that there are no
    runs in."""
    shape = (max(n, 1), 1) if stacked else (1, max(n, 1))
    fig, axes = plt.subplots(*shape, figsize=(width * shape[1], 4 * shape[0]), squeeze=False)
    # about 11 characters an inch: no title cut off
    fig.suptitle(textwrap.fill(title, int(11 * width * shape[1])))
    return fig, list(axes.flat)


def _no_runs(ax, y=0.5):
    ax.text(0.5, y, NO_RUNS, ha="center", va="center", transform=ax.transAxes, color="gray",
            bbox={"facecolor": "white", "edgecolor": "none"})


def _save(plt, fig, path):
    fig.tight_layout()
    try:
        # never a half-written PNG
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def draw_curves(plt, series, teacher, title, path):
    """A panel per column; a training-term column that no run has (runs from before it was
    logged) is none."""
    columns = [c for c in series if series[c] or not c.startswith("train_")]
    fig, axes = _panels(plt, len(columns), title, width=5.5)
    for ax, column in zip(axes, columns):
        for label, points in series[column].items():
            epochs, mean, low, high = zip(*points)
            marker = "o" if len(epochs) < 20 else None  # dots only where they stay apart
            line, = ax.plot(epochs, mean, label=label, marker=marker, markersize=3)
            # the band is the min-max over seeds
            ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        if teacher.get(column) is not None:
            ax.axhline(teacher[column], color="black", linestyle="--", linewidth=1, label="Teacher")
        if series[column]:
            ax.legend(fontsize=8)
        else:
            _no_runs(ax)
        ax.set(xlabel="epoch", ylabel=CURVE_LABELS.get(column, column))
        # whole epochs, even for a run of one
        ax.xaxis.get_major_locator().set_params(integer=True, min_n_ticks=1)
    _save(plt, fig, path)


def draw_bars(plt, bars_by_pair, title, ylabel, path):
    fig, axes = _panels(plt, len(bars_by_pair), title)
    for ax, (pair, bars) in zip(axes, bars_by_pair.items()):
        if bars:
            labels, summaries = zip(*bars)
            means = [s["mean"] for s in summaries]
            stds = [s["std"] or 0 for s in summaries]
            ax.bar(labels, means, yerr=stds, capsize=3)
            ax.tick_params(axis="x", labelrotation=30)
        else:
            _no_runs(ax)
        ax.set(title=pair.replace(":", " → "), ylabel=ylabel)
    _save(plt, fig, path)


def draw_ablation(plt, by_pair, xlabel, title, path):
    fig, axes = _panels(plt, len(by_pair), title)
    for ax, (pair, (points, paper)) in zip(axes, by_pair.items()):
        xs = [x for x, _ in points]
        if points:
            means = [s["mean"] for _, s in points]
            stds = [s["std"] or 0 for _, s in points]
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3,
                        label="ours: mean ± std over seeds")
        else:
            _no_runs(ax, y=0.25)  # below the paper's mark, which is centred
        if paper:
            ax.errorbar([paper[0]], [paper[1]], yerr=[paper[2] or 0],
                        marker="*", markersize=12, color="tab:red", linestyle="none", capsize=3,
                        label="paper, Table 4 (PEFD)")
        ax.set_xticks(sorted({*xs, *paper[:1]}) if paper else xs)
        ax.set(title=pair.replace(":", " → "), xlabel=xlabel, ylabel="top-1 (%) at the last epoch")
        if points or paper:
            ax.legend(fontsize=8)
    _save(plt, fig, path)


def draw_bench(plt, series, title, path):
    fig, axes = _panels(plt, len(series), title, width=8, stacked=True)  # its loops' names are long
    for ax, (pair, rows) in zip(axes, series.items()):
        top = max((speed or 0 for _, speed, _, _ in rows), default=0) or 1
        for i, (_, speed, mfu, skipped) in enumerate(rows):
            if speed:
                ax.barh(i, speed, color="tab:blue")
                mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
                note = f" {speed:,.0f} img/s, MFU {mfu_text}"
            else:
                note = f" skipped: {skipped}"  # a note, never a bar of 0
            ax.text(speed or 0, i, note, va="center", fontsize=8)
        ax.set_yticks(range(len(rows)), [loop for loop, *_ in rows], fontsize=8)
        ax.set(xlim=(0, 1.6 * top), title=pair, xlabel="images/s (higher is better)")
        ax.invert_yaxis()  # in bench.md's order, top to bottom
    if not series:
        _no_runs(axes[0])
    _save(plt, fig, path)
