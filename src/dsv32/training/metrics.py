"""Run metrics for every verb: one JSON object per line in a JSONL file, and a progress bar.

Every record has `step` (optimizer steps done); the trainer's also have `kind` ("train" or
"eval"). On resume the records written after the checkpoint's step are dropped
(`truncate_after`), since the resumed run writes them again; so a resumed run's file reads like
an uninterrupted one. A fresh run starts with `truncate_after(0)`, which also drops the records
of a run killed before its first checkpoint. A run killed (or out of disk) in the middle of a
write leaves a torn last line: reading drops it with a warning naming the file and the line, so
the run resumes; an unreadable line anywhere else is an error naming both.

Left out: TensorBoard / W&B writers (a JSONL file is trivial to load into either), and
multi-rank aggregation: only the process that owns the file writes to it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping

from tqdm import tqdm


def _plain(value: Any) -> Any:
    """JSON-safe: 0-dim tensors to floats, non-finite floats to strings."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL metrics file, in order ([] when there is none). A torn last line
    is dropped with a warning; any other line that is not a JSON object is a ValueError."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), start=1)
             if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            record, problem = None, str(e)
        else:
            problem = "" if isinstance(record, dict) else f"a JSON {type(record).__name__}, not an object"
        if not problem:
            records.append(record)
        elif i == len(lines) - 1:
            warnings.warn(f"{path}, line {n}: dropped a torn last record (a write cut short: {problem})",
                          stacklevel=2)
        else:
            raise ValueError(f"{path}, line {n}: not a metrics record ({problem})")
    return records


class MetricsLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write(self, record: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")

    def read(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def _tmp(self) -> Path:
        return self.path.with_name(self.path.name + ".tmp")

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (atomically: a new file renamed over the old), and
        the temporary files of truncations that never finished (this one's, `NAME.tmp`, and the
        old RL log's `.NAME.tmp-PID`)."""
        for stale in [self._tmp(), *self.path.parent.glob(f".{self.path.name}.tmp-*")]:
            stale.unlink(missing_ok=True)
        if not self.path.exists():
            return
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        tmp = self._tmp()
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)


class Progress:
    """A tqdm bar over optimizer steps on stderr, showing the given numbers and (tqdm's own) ETA;
    when enabled it appears on a terminal only (quiet in tests and logs)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool = True) -> None:
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr,
                        disable=None if enabled else True, dynamic_ncols=True, leave=False)

    def update(self, **numbers: float) -> None:
        """One step done; `numbers` (name -> value) shown beside the bar (tok_s as tok/s)."""
        fields = {k: f"{v:.4g}" for k, v in numbers.items() if k != "tok_s"}
        if "tok_s" in numbers:
            fields["tok/s"] = f"{numbers['tok_s']:,.0f}"
        self.bar.set_postfix(fields, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
