"""Pictures of a DSA model: retrieval accuracy by length and depth, and what the indexer selects.

* `plot_retrieval_heatmap` — exact-match (or answer-token) accuracy, prompt length (rows) x
  needle depth (columns), one panel per task plus their mean;
* `plot_selection` — for one real sequence and one layer: the causal mask (which keys each
  query may see), the indexer's actual selection (which keys each query attends to under
  DSA), and, per query, the share of the dense attention mass that selection captures next
  to the most any k keys could capture.

Figures are drawn on `matplotlib.figure.Figure` objects and saved with the Agg renderer,
without pyplot, so nothing global (backend, open figures) is touched and no display is needed.
matplotlib is an optional dependency (`pip install dsv32[plots]`), imported when drawing.

Left out: interactive views and attention maps per head (the selection is shared by heads).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .dsa import SelectionReport


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError("plots need matplotlib: pip install 'dsv32[plots]'") from None
    return Figure(figsize=(width, height), layout="constrained")


_HEATMAP_VALUES = {"accuracy": "exact-match accuracy", "token_accuracy": "answer token accuracy"}


def plot_retrieval_heatmap(rows: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "",
                           value: str = "accuracy", xlabel: str = "needle depth") -> Path:
    """Rows as returned by `retrieval_eval` -> a PNG of heatmaps at `path` of `value`:
    "accuracy" (exact match) or "token_accuracy" (teacher-forced answer tokens)."""
    if not rows:
        raise ValueError("no retrieval results to plot")
    if value not in _HEATMAP_VALUES:
        raise ValueError(f"value must be one of {sorted(_HEATMAP_VALUES)}, got {value!r}")
    tasks = sorted({r["task"] for r in rows})
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    panels = tasks + (["mean"] if len(tasks) > 1 else [])
    fig = _figure(1.2 + 0.75 * len(depths) * len(panels), 1.4 + 0.45 * len(lengths))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, panel in zip(axes, panels):
        grid = torch.zeros(len(lengths), len(depths))
        count = torch.zeros(len(lengths), len(depths))
        for r in rows:
            if panel in ("mean", r["task"]):
                i, j = lengths.index(r["length"]), depths.index(r["depth"])
                grid[i, j] += r[value] * r["n"]
                count[i, j] += r["n"]
        acc = grid / count.clamp(min=1)
        image = ax.imshow(acc.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="lower")
        for i in range(len(lengths)):
            for j in range(len(depths)):
                ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if acc[i, j] < 0.6 else "black")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel(xlabel)
        ax.set_title(panel)
    axes[0].set_ylabel("prompt length (tokens)")
    fig.colorbar(image, ax=list(axes), label=_HEATMAP_VALUES[value], shrink=0.9)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_selection(report: SelectionReport, layer: int, path: str | Path, *, row: int = 0,
                   title: str = "") -> Path:
    """Causal mask | indexer selection | captured dense mass per query, for sequence `row` of
    the batch `report` was made on (see `dsa.selection_report`)."""
    if layer not in report.indices:
        raise ValueError(f"layer must be one of {sorted(report.indices)}, got {layer}")
    idx = report.indices[layer][row].cpu()                                   # (T, K)
    T = idx.shape[0]
    valid = (torch.ones(T, dtype=torch.bool) if report.query_valid is None
             else report.query_valid[row].cpu())
    causal = torch.ones(T, T, dtype=torch.bool).tril() & valid[None, :] & valid[:, None]
    selected = torch.zeros(T, T + 1, dtype=torch.bool)
    selected.scatter_(1, torch.where(idx >= 0, idx, T), True)               # -1 lands in a spare column
    selected = selected[:, :T]
    mass, ceiling = report.mass[layer][row].cpu(), report.ceiling[layer][row].cpu()

    fig = _figure(13.0, 4.4)
    ax_mask, ax_sel, ax_mass = fig.subplots(1, 3)
    for ax, image, name in ((ax_mask, causal, "causal mask (allowed keys)"),
                            (ax_sel, selected, f"indexer selection (top-{idx.shape[1]})")):
        # "antialiased": a long sequence is drawn as the density of selected keys per pixel.
        ax.imshow(image.float().numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="antialiased")
        ax.set_title(name)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    positions = torch.arange(T)[valid]
    ax_mass.plot(positions.numpy(), mass[valid].numpy(), lw=0.8, color="tab:blue", label="indexer's selection")
    # Dashed and on top: where the two coincide the ceiling stays visible.
    ax_mass.plot(positions.numpy(), ceiling[valid].numpy(), lw=0.6, ls="--", color="tab:orange",
                 label="best possible (top-k of the dense attention)")
    ax_mass.axvline(idx.shape[1] - 0.5, color="grey", ls=":", lw=0.8, label="k (all keys selected before)")
    ax_mass.set_ylim(0, 1.02)
    ax_mass.set_xlabel("query position")
    ax_mass.set_ylabel("dense attention mass inside the selection")
    ax_mass.set_title(f"captured mass: mean {float(mass[valid].mean()):.3f} of at most "
                      f"{float(ceiling[valid].mean()):.3f}")
    ax_mass.legend(loc="lower left", fontsize=8)
    fig.suptitle(title or f"layer {layer}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
