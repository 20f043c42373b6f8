"""Training metrics: one JSON object per line in `metrics.jsonl`, and a progress bar.

Every record has `step` (optimizer steps done) and `kind` ("train" or "eval"). On resume the
records written after the checkpoint's step are dropped, since the resumed run writes them
again; so a resumed run's file reads like an uninterrupted one.

Left out: TensorBoard / W&B writers (a JSONL file is trivial to load into either), and
multi-rank aggregation: only the process that owns the file writes to it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


def _plain(value: Any) -> Any:
    """JSON-safe: 0-dim tensors to floats, non-finite floats to strings."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (atomically: a new file renamed over the old)."""
        if not self.path.exists():
            return
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)


class Progress:
    """A tqdm bar over optimizer steps showing loss, tokens/s and (tqdm's own) ETA."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool = True) -> None:
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled,
                        dynamic_ncols=True)

    def update(self, loss: float, tokens_per_s: float, **extra: float) -> None:
        fields = {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_s:,.0f}"}
        fields.update({k: f"{v:.4g}" for k, v in extra.items()})
        self.bar.set_postfix(fields, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
