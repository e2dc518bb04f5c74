"""Figures a person would rather look at than read: training curves, recall@k curves, retrieval examples.

Every function writes one PNG (atomically, through a temporary file) with matplotlib's non-interactive Agg
backend, so plotting works on headless machines.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from recallk.evaluation.knn import exact_knn  # noqa: E402
from recallk.files import atomic_write, read_metrics  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
    return path


def plot_training_curves(
    path: Path, metrics_csv: Path, select_metric: str | None = None, best_epoch: int | None = None,
    steps_csv: Path | None = None,
) -> Path | None:
    """:func:`training_curves_figure` saved as a PNG at ``path`` (None when ``metrics.csv`` is empty)."""
    fig = training_curves_figure(metrics_csv, select_metric, best_epoch, steps_csv)
    return None if fig is None else _save(fig, path)


def training_curves_figure(
    metrics_csv: Path, select_metric: str | None = None, best_epoch: int | None = None, steps_csv: Path | None = None,
) -> plt.Figure | None:
    """Training loss and validation recall@k from a run's ``metrics.csv`` (None if it is empty).

    The loss panel shows the loss of every optimiser step from ``steps_csv`` (``step``, ``epoch``, ``loss`` rows;
    a thin line against the fractional epoch) and each epoch's mean (dots). The validation panel exists only when
    the run has validation columns; ``select_metric`` (the metric that picks ``best.pt``, e.g. ``map@r``) is drawn
    bold, the legend sits beside the panel (never over a curve), and ``best_epoch`` is marked on both panels.
    """
    rows = read_metrics(metrics_csv)
    if not rows:
        return None
    epochs = [float(r["epoch"]) for r in rows]  # fractional for a run that ended mid-epoch (train.max_steps)
    shown = [k for k in rows[0] if k.startswith("val_recall@")]
    selected = f"val_{select_metric}" if select_metric else None
    if selected in rows[0] and selected not in shown:
        shown.append(selected)
    has_validation = any(r.get(k) for r in rows for k in shown)
    fig, axes = plt.subplots(1, 2 if has_validation else 1, figsize=(11 if has_validation else 5, 3.8), squeeze=False,
                             sharex=True)
    ax_loss = axes[0, 0]
    steps = read_metrics(steps_csv) if steps_csv is not None else []
    if steps:
        ax_loss.plot([float(r["epoch"]) for r in steps], [float(r["loss"]) for r in steps], lw=0.8, alpha=0.6,
                     color="#4c72b0", label="each step")
    ax_loss.plot(epochs, [float(r["train_loss"]) for r in rows], marker="o", ms=4, lw=1.5, color="#1f3a68",
                 label="epoch mean")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss", xlim=(0, max(epochs) * 1.02))
    if has_validation:
        ax_val = axes[0, 1]
        for key in shown:
            points = [(e, float(r[key])) for e, r in zip(epochs, rows) if r.get(key)]
            if points:
                bold = key == selected
                label = key.removeprefix("val_") + (" (selects best.pt)" if bold else "")
                ax_val.plot(*zip(*points), marker="o", ms=4 if bold else 3, lw=2.5 if bold else 1.2, label=label)
        ax_val.set(xlabel="epoch", ylabel="metric", title="Validation", ylim=(0, 1))
    for ax in axes[0]:
        if best_epoch is not None and best_epoch > 0:
            ax.axvline(best_epoch, color="#555555", ls="--", lw=1, label=f"best epoch {best_epoch}")
        ax.grid(alpha=0.3)
    if has_validation:  # beside the panel: a legend inside would cover the curves it names
        axes[0, 1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=8)
    if steps or (best_epoch is not None and best_epoch > 0):
        ax_loss.legend(fontsize=8)
    return fig


def plot_recall_curves(path: Path, results: Mapping[str, Mapping[str, Any]]) -> Path:
    """Recall@k against k (log scale) for each named result (e.g. ``{"raw pixels": ..., "trained": ...}``)."""
    fig, ax = plt.subplots(figsize=(5, 3.8))
    for name, metrics in results.items():
        ks = sorted(int(k.split("@")[1]) for k in metrics if k.startswith("recall@"))
        ax.plot(ks, [metrics[f"recall@{k}"] for k in ks], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="k", ylabel="recall@k", title="Retrieval recall@k", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_retrievals(
    path: Path, embeddings: torch.Tensor, source: Any, num_queries: int = 8, k: int = 5, seed: int = 0
) -> Path:
    """A grid: random queries (left column) and their top-k retrievals, framed green (same class) or red.

    Image sources are drawn with ``source.display_image(i)``; text sources (``display_text``) as wrapped text.
    """
    labels = torch.as_tensor(source.labels)
    rng = np.random.default_rng(seed)
    queries = torch.as_tensor(np.sort(rng.choice(len(labels), size=min(num_queries, len(labels)), replace=False)))
    _, neighbours = exact_knn(embeddings[queries], embeddings, k, self_index=queries)
    is_text = hasattr(source, "display_text")
    cell = (2.4, 1.0) if is_text else (1.3, 1.3)
    fig, axes = plt.subplots(  # constrained: the title sits right above the grid, without an empty band
        len(queries), k + 1, figsize=(cell[0] * (k + 1), cell[1] * len(queries)), squeeze=False, layout="constrained"
    )
    for row, query in enumerate(queries.tolist()):
        items = [(query, None)] + [(int(j), bool(labels[j] == labels[query])) for j in neighbours[row]]
        for col, (index, correct) in enumerate(items):
            ax = axes[row, col]
            if is_text:
                text = textwrap.fill(textwrap.shorten(source.display_text(index), 90), 28)
                ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=6, transform=ax.transAxes)
            else:
                image = source.display_image(index)
                ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            colour = "black" if correct is None else ("#1a9850" if correct else "#d73027")
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(1 if correct is None else 3)
    axes[0, 0].set_title("query", fontsize=9)
    for col in range(1, k + 1):
        axes[0, col].set_title(f"#{col}", fontsize=9)
    fig.suptitle("Top retrievals (green: same class, red: other class)", fontsize=10)
    return _save(fig, path)


def plot_neighbours(
    path: Path, query: Any, neighbours: list[tuple[Any, float]], title: str = "query"
) -> Path:
    """One query image (left) and its nearest gallery images, each captioned with its similarity.

    Images are PIL images or arrays (H, W) / (H, W, 3).
    """
    fig, axes = plt.subplots(1, len(neighbours) + 1, figsize=(1.8 * (len(neighbours) + 1), 2.2), squeeze=False,
                             layout="constrained")
    cells = [(query, "query")] + [(image, f"#{i} sim {sim:.3f}") for i, (image, sim) in enumerate(neighbours, 1)]
    for ax, (image, caption) in zip(axes[0], cells):
        array = np.asarray(image)
        ax.imshow(array, cmap="gray" if array.ndim == 2 else None)
        ax.set_title(caption, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(textwrap.shorten(title, 100), fontsize=9)
    return _save(fig, path)
