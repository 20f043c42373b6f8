"""Training curves from metrics records (the JSONL files the RL loops write), one panel per
metric and one line per run, drawn with matplotlib's Agg backend (no display needed).

Left out on purpose: smoothing (curves are short and every step is a real rollout), and
interactive or live plotting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

DEFAULT_METRICS = ("reward_mean", "accuracy", "eval_accuracy", "kl", "clip_frac", "masked_frac",
                   "ratio_mean", "ratio_max", "entropy", "response_length")


def plot_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path,
                metrics: Sequence[str] = DEFAULT_METRICS, title: str = "") -> Path:
    """Save a PNG of `metrics` against `step` for each run (label -> records). Metrics no run
    recorded are skipped; missing or null values leave gaps. Returns the path written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in metrics if any(r.get(m) is not None for recs in runs.values() for r in recs)]
    if not shown:
        raise ValueError(f"none of the metrics {list(metrics)} appear in the records")
    cols = min(3, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.9 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, shown):
        for label, records in runs.items():
            points = [(r["step"], r[metric]) for r in records if r.get(metric) is not None]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=label, marker="." if len(points) < 30 else None)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown):]:
        ax.set_visible(False)
    if len(runs) > 1:
        axes.flat[0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
