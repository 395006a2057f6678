"""The plots of kiln's pages, drawn with matplotlib's Agg backend (no display) as PNG bytes.

Each function takes plain numbers (no step objects), so any page can use it; the
figures are built through ``matplotlib.figure.Figure`` rather than pyplot, which keeps no
global state between plots and never picks an interactive backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kiln.html import figure_png


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def training_curves(history: Sequence[Mapping[str, float]], best_epoch: int | None = None) -> bytes:
    """Train/val loss (left) and val accuracy (right) per epoch, the best epoch marked."""
    from matplotlib.ticker import MaxNLocator

    if not history:
        raise ValueError("no epochs to plot")
    epochs = [int(r["epoch"]) for r in history]
    fig = _figure(9, 3.5)
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [r["train_loss"] for r in history], "o-", label="train loss")
    loss_ax.plot(epochs, [r["val_loss"] for r in history], "o-", label="val loss")
    acc_ax.plot(epochs, [r["val_accuracy"] for r in history], "o-", color="tab:green", label="val accuracy")
    for ax, title in ((loss_ax, "cross-entropy"), (acc_ax, "validation accuracy")):
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    return figure_png(fig)


def confusion_heatmap(matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> bytes:
    """Counts of true (rows) x predicted (columns) classes, colour by row share so a weak
    class stands out whatever its support; every cell is annotated with its count."""
    import numpy as np

    counts = np.asarray(matrix, dtype=np.int64)
    if counts.ndim != 2 or counts.shape != (len(labels), len(labels)):
        raise ValueError(f"confusion matrix of shape {counts.shape} for {len(labels)} labels")
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = _figure(5.2, 4.6)
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if counts[i, j]:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(image, ax=ax, label="share of the true class")
    return figure_png(fig)


def recall_bars(recall: Mapping[str, float], threshold: float | None = None) -> bytes:
    """One bar per class (its recall), the blessing threshold as a line; bars under it red."""
    if not recall:
        raise ValueError("no classes to plot")
    labels, values = list(recall), [float(v) for v in recall.values()]
    fig = _figure(6, 3)
    ax = fig.subplots()
    colours = ["tab:red" if threshold is not None and v < threshold else "tab:blue" for v in values]
    ax.bar(labels, values, color=colours)
    if threshold is not None:
        ax.axhline(threshold, color="grey", linestyle="--", label=f"min class recall {threshold:g}")
        ax.legend(loc="lower right")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("class")
    ax.set_ylabel("recall")
    ax.grid(axis="y", alpha=0.3)
    return figure_png(fig)


def accuracy_bars(accuracies: Mapping[str, float], title: str) -> bytes:
    """Horizontal bars of accuracy per named model (challenger/champion, fp32/int8/fp16),
    the axis zoomed to the range they span so half-point differences are visible."""
    if not accuracies:
        raise ValueError("nothing to plot")
    names, values = list(accuracies), [float(v) for v in accuracies.values()]
    low = max(0.0, min(values) - 0.05)
    fig = _figure(6, 0.6 + 0.45 * len(names))
    ax = fig.subplots()
    ax.barh(names, values, color="tab:blue")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.4f}", va="center", fontsize=8)
    ax.set_xlim(low, min(1.0, max(values) + 0.03))
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy")
    ax.set_title(title)
    return figure_png(fig)
