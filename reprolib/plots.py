"""Figures the notebooks share. Each returns the matplotlib Figure and saves it when `path` is given."""
from pathlib import Path

import matplotlib

if not matplotlib.get_backend().lower().startswith(("module://matplotlib_inline", "inline", "nbagg", "qt", "tk",
                                                      "macosx")):
    matplotlib.use("Agg")  # headless (CI, papermill without inline backend)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from reprolib.fileio import atomic_write  # noqa: E402

RECALL_DEPTHS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def _finish(fig, path):
    fig.tight_layout()
    if path:   # whole or not at all: a stage stopped mid-save leaves no torn image for REPORT.md to show
        with atomic_write(path, "wb") as f:
            fig.savefig(f, dpi=110, format=Path(path).suffix.lstrip(".") or None)
    return fig


def recall_curve(recalls, path=None, title="Recall@k"):
    """`recalls`: {system name: {k: recall}}; x axis on a log scale."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, by_depth in recalls.items():
        depths = sorted(by_depth)
        ax.plot(depths, [by_depth[k] for k in depths], marker="o", ms=3, label=name)
    ax.set(xscale="log", xlabel="k (passages retrieved)", ylabel="recall@k", ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _finish(fig, path)


def weight_curve(by_weight, metric, picked=None, path=None, title="Fusion weight"):
    """`by_weight`: {weight of the second run: metric}; the picked weight marked."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    weights = sorted(by_weight)
    ax.plot(weights, [by_weight[w] for w in weights], marker="o", ms=4)
    if picked is not None:
        ax.axvline(picked, color="grey", ls="--", label=f"picked: {picked}")
        ax.legend()
    ax.set(xlabel="weight of the second run", ylabel=metric, title=title)
    ax.grid(alpha=0.3)
    return _finish(fig, path)


def per_query_histogram(values, metric, path=None):
    """`values`: {system name: {qid: value}}; shows how a mean hides easy and failed queries."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    bins = np.linspace(0, 1, 21)
    for name, per_query in values.items():
        ax.hist(list(per_query.values()), bins=bins, alpha=0.6, label=f"{name} (mean {np.mean(list(per_query.values())):.3f})")
    ax.set(xlabel=f"per-query {metric}", ylabel="queries", title=f"Distribution of {metric} over queries")
    ax.legend()
    return _finish(fig, path)


def metric_bars(table, path=None, title="Metrics by stage"):
    """`table`: {stage: {metric: value}}; one group of bars per metric."""
    shared = sorted({m for row in table.values() for m in row})
    fig, ax = plt.subplots(figsize=(max(5.5, 1.2 * len(shared) * max(1, len(table)) / 2), 3.6))
    width = 0.8 / max(1, len(table))
    for i, (stage, row) in enumerate(table.items()):
        xs = [j + i * width for j, m in enumerate(shared) if m in row]
        ax.bar(xs, [row[m] for m in shared if m in row], width, label=stage)
    ax.set_xticks([j + width * (len(table) - 1) / 2 for j in range(len(shared))], shared, rotation=30, ha="right")
    ax.set(ylabel="value", title=title)
    ax.legend()
    return _finish(fig, path)


def loss_curve(curves, path=None, title="Training loss"):
    """`curves`: {name: (steps, losses)}; a moving average is drawn over the raw (faint) values."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, (steps, losses) in curves.items():
        steps, losses = np.asarray(steps, float), np.asarray(losses, float)
        line, = ax.plot(steps, losses, alpha=0.3, lw=1)
        window = max(1, len(losses) // 20)
        if window > 1:
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, color=line.get_color(), lw=1.8, label=name)
        else:
            line.set(alpha=1, label=name)
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _finish(fig, path)


def score_histogram(scores, path=None, title="Scores of positives and negatives", xlabel="score q·p"):
    """`scores`: {label: array of query-passage scores}, e.g. positives vs hard negatives; overlap = confusion."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    values = [np.asarray(v, float) for v in scores.values() if len(v)]
    if values:
        bins = np.linspace(min(v.min() for v in values), max(v.max() for v in values), 40)
        for label, v in scores.items():
            if len(v):
                ax.hist(v, bins=bins, alpha=0.55, density=True, label=f"{label} (n={len(v):,})")
    ax.set(xlabel=xlabel, ylabel="density", title=title)
    ax.legend()
    return _finish(fig, path)


def histogram(values, path=None, title="", xlabel="", ylabel="count", limit=None, limit_label=None, bins=30):
    """`values`: {label: numbers} drawn as overlaid histograms (lengths, norms, ...); `limit`: a dashed red line
    at that x (e.g. the max length, beyond which text is cut)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for label, v in values.items():
        ax.hist(np.asarray(v, float), bins=bins, alpha=0.6 if len(values) > 1 else 1, label=label)
    if limit is not None:
        ax.axvline(limit, color="red", ls="--", label=limit_label or f"{limit}")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend()
    return _finish(fig, path)


def rank_histogram(ranks, depth, path=None, title="Where the positives are"):
    """`ranks`: the rank of each query's first positive (depth + 1 when it was not retrieved); log x axis."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.hist(np.minimum(ranks, depth + 1), bins=np.logspace(0, np.log10(depth + 2), 25))
    ax.set(xscale="log", xlabel=f"rank of the first positive ({depth + 1} = not retrieved)", ylabel="queries",
           title=title)
    return _finish(fig, path)


def sparsity_histogram(nonzeros, path=None, title="Non-zero weights per text"):
    """`nonzeros`: {label: non-zero count per text}, e.g. queries and passages of a sparse index; log x axis
    (texts with no weight at all are counted in the legend)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    values = {label: np.asarray(v) for label, v in nonzeros.items() if np.any(np.asarray(v) > 0)}
    if values:
        low = min(int(v[v > 0].min()) for v in values.values())
        high = max(int(v.max()) for v in values.values())
        bins = np.geomspace(low, max(high, low + 1) + 1, 40)
        for label, v in values.items():
            empty = int((v == 0).sum())
            ax.hist(v[v > 0], bins=bins, alpha=0.55, label=f"{label} (median {np.median(v):g}"
                    + (f", {empty:,} empty" if empty else "") + ")")
        ax.legend()
    ax.set(xscale="log", xlabel="non-zero weights", ylabel="texts", title=title)
    return _finish(fig, path)


def attention_mask(visibility, tokens, path=None, title="Attention mask"):
    """`visibility`: [L, L] 0/1, row i may attend to column j where 1; tokens label both axes."""
    visibility = np.asarray(visibility)
    size = max(4.0, 0.2 * len(tokens) + 1.5)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(visibility, cmap="Greys", vmin=0, vmax=1.6, interpolation="nearest")
    ticks = np.arange(len(tokens))
    ax.set_xticks(ticks, tokens, rotation=90, fontsize=7)
    ax.set_yticks(ticks, tokens, fontsize=7)
    ax.set(xlabel="attends to (key / value position)", ylabel="reconstructs (query position)", title=title)
    return _finish(fig, path)


def score_matrix(scores, group_size, path=None, title="In-batch scores"):
    """`scores`: [B, B*G] query-by-passage scores of one batch, passages grouped [p+, n1 .. n_{G-1}] per query.
    Each row's target (its own positive, column i*G) is boxed; lines separate the queries' groups."""
    scores = np.asarray(scores, float)
    rows, columns = scores.shape
    fig, ax = plt.subplots(figsize=(max(5.5, 0.45 * columns + 1.5), max(2.8, 0.45 * rows + 1.4)))
    image = ax.imshow(scores, cmap="viridis", aspect="auto")
    for i in range(rows):
        ax.add_patch(plt.Rectangle((i * group_size - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    for boundary in range(group_size, columns, group_size):
        ax.axvline(boundary - 0.5, color="white", lw=1)
    ax.set_xticks(range(columns), [f"q{c // group_size}{'+' if c % group_size == 0 else '-'}" for c in range(columns)])
    ax.set_yticks(range(rows), [f"q{i}" for i in range(rows)])
    ax.set(xlabel="passage (q0+: query 0's positive, q0-: its negatives)", ylabel="query",
           title=title)
    fig.colorbar(image, ax=ax, label="score / τ")
    return _finish(fig, path)


def term_weights(terms, path=None, title="Heaviest vocabulary terms"):
    """`terms`: [(term, weight)] in decreasing weight, e.g. the top of a lexicon (sparse) vector."""
    fig, ax = plt.subplots(figsize=(5.5, max(2.5, 0.22 * len(terms) + 1)))
    names, weights = zip(*terms) if terms else ((), ())
    ax.barh(range(len(names))[::-1], weights, color="tab:purple")
    ax.set_yticks(range(len(names))[::-1], names, fontsize=8)
    ax.set(xlabel="weight", title=title)
    return _finish(fig, path)


STATUS_COLORS = {"OK": "tab:green", "OKISH": "tab:orange", "FAIL": "tab:red"}


def checks_plot(checks, path=None, title="Measured vs the reference"):
    """`checks`: rows of reprolib.report.run_checks. One line per check, drawn as measured − reference, so that
    metrics of any scale share the axis: the reference (the paper's number, or the control stage's mean) is the
    line at 0. A paper check shades its tolerance on both sides; a check against a control marks the margin
    `by` it must win by with a tick (an equivalence, `within`, shades its band). The measured value is a dot
    coloured by status (a missing one is a red ✗)."""
    fig, ax = plt.subplots(figsize=(7, max(2.2, 0.45 * len(checks) + 1.3)))
    labelled = set()  # one legend entry per kind of mark

    def label(name):
        if name in labelled:
            return "_nolegend_"
        labelled.add(name)
        return name

    for y, row in enumerate(checks):
        if "at_most" in row:
            pass                              # the bound is the line at 0: a dot left of it is within
        elif "loses_at_most" in row:
            ax.scatter(-float(row["loses_at_most"]), y, marker="|", s=250, color="0.4", zorder=2,
                       label=label("loss allowed"))
        elif "than" in row and "within" not in row:
            ax.scatter(row.get("by", 0.0), y, marker="|", s=250, color="0.4", zorder=2, label=label("margin to win by"))
        else:
            tolerance = float(row.get("within", row.get("tolerance")))
            ax.barh(y, 2 * tolerance, left=-tolerance, height=0.6, color="0.85", label=label("tolerance"))
        if row["difference"] is None or not np.isfinite(row["difference"]):
            ax.scatter(0, y, marker="x", s=60, color=STATUS_COLORS["FAIL"], zorder=3, label=label("missing"))
            continue
        ax.scatter(row["difference"], y, s=45, color=STATUS_COLORS[row["status"]], zorder=3, label=label(row["status"]))
        text = f"{row['measured']:.4g}" + ("" if row["p_value"] is None else f", p {row['p_value']:.2g}")
        ax.annotate(text, (row["difference"], y), xytext=(6, 0), textcoords="offset points", va="center", fontsize=8)
    ax.axvline(0, color="black", lw=1, label="reference")
    names = [f"{c['stage']} {c['metric']} " + (f"(vs {c['than']})" if "than" in c else
                                                 f"(at most {c['at_most']:g})" if "at_most" in c else f"(paper {c['value']})")
             for c in checks]
    ax.set_yticks(range(len(checks)), names, fontsize=8)
    ax.invert_yaxis()  # the first check on top, as in the tables
    ax.set(xlabel="measured − reference", title=title)
    ax.grid(axis="x", alpha=0.3)
    if checks:
        ax.legend(fontsize=8, loc="best")
    return _finish(fig, path)


def dataset_bars(rows, path=None, title="Zero-shot results"):
    """`rows`: {dataset: {metric: value}} in display order (e.g. reprolib.zero_shot.summarize, whose last row
    is the average); one group of bars per dataset, one bar per metric."""
    names = list(rows)
    metrics = list(dict.fromkeys(m for row in rows.values() for m in row))
    fig, ax = plt.subplots(figsize=(max(5.5, 0.35 * len(names) * max(1, len(metrics)) + 1.5), 3.8))
    width = 0.8 / max(1, len(metrics))
    for i, metric in enumerate(metrics):
        xs = [j + i * width for j, name in enumerate(names) if metric in rows[name]]
        ax.bar(xs, [rows[name][metric] for name in names if metric in rows[name]], width, label=metric)
    ax.set_xticks([j + width * (len(metrics) - 1) / 2 for j in range(len(names))], names, rotation=30, ha="right")
    ax.set(ylabel="value", ylim=(0, 1.02), title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _finish(fig, path)


def margin_scatter(teacher, students, path=None, title="Student vs teacher margins"):
    """`teacher`: margins s(q,p+) - s(q,p-) of the teacher; `students`: {label: the student's margins of the
    same pairs}. On the diagonal (up to scale) the student has learned the teacher's ranking."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, margins in students.items():
        ax.scatter(teacher, margins, s=6, alpha=0.4, label=label)
    ax.axhline(0, color="grey", lw=0.6)
    ax.axvline(0, color="grey", lw=0.6)
    ax.set(xlabel="teacher margin", ylabel="student margin", title=title)
    ax.legend()
    return _finish(fig, path)
