"""`dsv32 demo` in its reduced mode: every stage runs, the report and its plots exist and hold
real numbers, a second run reuses the finished stages, --fresh starts over."""

from __future__ import annotations

import math
import re

from dsv32.cli import main


def test_demo_quick_writes_a_report_with_real_numbers(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed
    report = (out / "report.md").read_text()
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        path = out / image
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
    assert len(re.findall(r"!\[", report)) >= 5
    # The dense vs sparse table and the recall table hold finite numbers.
    rows = [line for line in report.splitlines() if line.startswith("| dense (pretrained)")
            or line.startswith("| sparse (converted)") or line.startswith("| after warm-up")]
    assert len(rows) == 3
    for row in rows:
        numbers = [float(x) for x in re.findall(r"\d+\.\d+", row)]
        assert numbers and all(math.isfinite(x) for x in numbers)
    assert "```" in report                                   # generated samples
    # The retrieval section: dense, the control and converted sparse, with finite numbers.
    section = report.split("## Retrieval: does DSA keep it?")[1].split("## GRPO")[0]
    for stage in ("| dense |", "| sparse, untrained indexer (control) |", "| sparse, after sparse training |"):
        line = next(row for row in section.splitlines() if row.startswith(stage))
        assert all(math.isfinite(float(x)) for x in re.findall(r"\d+\.\d+", line))

    assert main(["demo", "--quick", "--out", str(out)]) == 0
    again = capsys.readouterr().out
    assert again.count("done before, reusing") == 9

    assert main(["demo", "--quick", "--out", str(out), "--seed", "1"]) == 2
    assert "--fresh" in capsys.readouterr().err
