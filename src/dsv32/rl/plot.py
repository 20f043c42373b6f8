"""Training curves from metrics records (the JSONL files the RL loops write), one panel per
metric and one line per run, drawn with matplotlib's Agg backend (no display needed).

Per-step RL metrics are noisy (one rollout each), so curves can be drawn as a trailing moving
average (`smooth` steps; sparse metrics such as eval_accuracy are never smoothed).

Left out on purpose: interactive or live plotting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

DEFAULT_METRICS = ("reward_mean", "accuracy", "eval_accuracy", "kl", "clip_frac", "masked_frac",
                   "ratio_mean", "ratio_max", "entropy", "response_length")


def _trailing_mean(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path,
                metrics: Sequence[str] = DEFAULT_METRICS, title: str = "", smooth: int = 1) -> Path:
    """Save a PNG of `metrics` against `step` for each run (label -> records). Metrics no run
    recorded are skipped; missing or null values leave gaps. smooth: trailing moving-average
    window for metrics recorded at every step (1 = raw). Returns the path written."""
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1 (1 = no smoothing), got {smooth}")
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
        smoothed = False
        for label, records in runs.items():
            points = [(r["step"], r[metric]) for r in records if r.get(metric) is not None]
            if not points:
                continue
            steps, values = zip(*points)
            every_step = len(points) == len(records)
            if every_step and smooth > 1:
                values, smoothed = _trailing_mean(values, smooth), True
            ax.plot(steps, values, label=label, marker=None if every_step else ".")
        ax.set_title(f"{metric} (mean of {smooth} steps)" if smoothed else metric)
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
