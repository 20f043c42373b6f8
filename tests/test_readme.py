"""Every code block of README.md works as written, and the docs point only at what exists.

* Each ```python block runs on its own, in a fresh interpreter and an empty folder (the blocks
  use the `tiny` preset and small step counts, so they are quick as written).
* Each ```bash block: every command line that calls the `dsv32` tool (`dsv32 VERB ...`,
  `python -m dsv32 ...`, `torchrun ... -m dsv32 ...`) is first parsed by the tool's own
  argument parser exactly as written (config files included), with the verb's handler
  replaced by a recorder; then the commands listed in `_SHRINK` run for real, in README order
  and in one folder (so `sft` then `grpo --model runs/sft` chain as in the README), with
  flags appended that shrink them to seconds (argparse keeps the last value of a flag).

The docs (README.md and docs/*.md) link only to files inside the repository, anchors included,
and every `dsv32.…` name written in docs/ imports, so a rename in the code shows up here.

The placeholders of the README are real files here: `CKPT` and `SRC` are a saved `tiny`
checkpoint, `DENSE` a tiny Llama-family one, `grpo.json` holds the keys its comment shows, and `configs/` is the repository's.

Left out on purpose: running `dsv32 demo` (tests/test_demo.py runs it in its quick mode),
commands under torchrun (their verbs run here single-process), `--resume` lines (they continue
runs with other settings than the shrunk ones) and a config file whose README comment elides
keys: those are parsed only.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)

# Flags appended to a command that runs for real, by verb (None: parse only).
_SMALL_DATA = ["--seq-len", "512", "--batch-size", "1", "--max-bytes", "1000000", "--warmup-steps", "1",
               "--tasks", "passkey", "--no-progress"]
_SHRINK: dict[str, list[str] | None] = {
    "info": [],
    "generate": ["--max-new-tokens", "8"],
    "convert": [],
    "sft": ["--steps", "2", "--batch-size", "4", "--warmup-steps", "1", "--train-size", "16", "--eval-size", "0"],
    "grpo": ["--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4",
             "--train-size", "16", "--eval-size", "4"],
    "pretrain": ["--steps", "2", *_SMALL_DATA],
    "sparsify": ["--steps", "2", *_SMALL_DATA],
    "eval": ["--seq-len", "512", "--max-bytes", "1000000", "--tasks", "passkey", "--lengths", "512",
             "--depths", "0.5", "--examples-per-cell", "1", "--eval-sequences", "1", "--batch-size", "1"],
    "demo": None,
}


def _blocks(lang: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, body) of every ```lang block of the README."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in _FENCE.finditer(text) if m.group(1) == lang]


def _commands(body: str) -> list[tuple[list[str], bool]]:
    """(argv after `dsv32`, launched by torchrun) of each line of a shell block that calls the tool."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["dsv32"]:
            out.append((words[1:], False))
        elif "-m" in words and words[words.index("-m") + 1:][:1] == ["dsv32"]:
            out.append((words[words.index("-m") + 2:], words[0] == "torchrun"))
    return out


def _ids(blocks: list[tuple[int, str]], lang: str) -> list[str]:
    return [f"{lang}-block-at-line-{line}" for line, _ in blocks]


PYTHON_BLOCKS = _blocks("python")
BASH_BLOCKS = [(line, body) for line, body in _blocks("bash") if _commands(body)]


def test_the_readme_has_the_blocks_this_test_checks():
    assert len(PYTHON_BLOCKS) >= 4 and len(BASH_BLOCKS) >= 3


@pytest.mark.parametrize("line, body", PYTHON_BLOCKS, ids=_ids(PYTHON_BLOCKS, "python"))
def test_python_block_runs(line, body, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    (tmp_path / "block.py").write_text(body)
    proc = subprocess.run([sys.executable, "block.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"README.md: the python block at line {line} fails (exit {proc.returncode}):\n"
                    f"{body}\n--- its output ---\n{(proc.stdout + proc.stderr)[-4000:]}", pytrace=False)


# ------------------------------------------------------------------------------- bash blocks
@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder holding what the README's commands refer to, made the current directory."""
    import dsv32
    model = dsv32.DSV32ForCausalLM(dsv32.ModelConfig.preset("tiny"))
    model.save_pretrained(tmp_path / "CKPT")
    model.save_pretrained(tmp_path / "SRC")
    from dsv32.model.gqa import GQAForCausalLM            # DENSE: a tiny Llama-family checkpoint (byte vocabulary)
    from dsv32.model.gqa_config import DenseConfig
    GQAForCausalLM(DenseConfig(model_type="llama", vocab_size=259, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                               max_position_embeddings=1024)).save_pretrained(tmp_path / "DENSE")
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    (tmp_path / "grpo.json").write_text(json.dumps({"model": "runs/sft", "out": "runs/grpo", "delta": None}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return tmp_path


def _parses(argv: list[str], monkeypatch) -> str | None:
    """None when `dsv32 argv` parses (flags, values, config file) up to its handler, else why not."""
    import argparse

    from dsv32 import cli

    real_build = cli.build_parser
    called = []

    def build_recording_parser() -> argparse.ArgumentParser:
        parser = real_build()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    sub.set_defaults(handler=lambda args: called.append(args) or 0)
        return parser

    monkeypatch.setattr(cli, "build_parser", build_recording_parser)
    try:
        code = cli.main(argv)
    except SystemExit as e:                 # --help
        code = e.code or 0
        called.append(None)
    finally:
        monkeypatch.setattr(cli, "build_parser", real_build)
    if code != 0:
        return f"exit code {code}"
    if argv and not argv[0].startswith("-") and not called:
        return "the verb's handler was never reached"
    return None


def _should_run(argv: list[str], torchrun: bool) -> bool:
    return (bool(argv) and not torchrun and _SHRINK.get(argv[0]) is not None and "--resume" not in argv
            and not (argv[0] == "grpo" and "--config" in argv))


@pytest.mark.parametrize("line, body", BASH_BLOCKS, ids=_ids(BASH_BLOCKS, "bash"))
def test_bash_block_commands(line, body, workdir, monkeypatch, capsys):
    from dsv32.cli import main

    commands = _commands(body)
    for argv, _ in commands:
        why = _parses(argv, monkeypatch)
        err = capsys.readouterr().err
        if why:
            pytest.fail(f"README.md, bash block at line {line}: `dsv32 {shlex.join(argv)}` does not parse "
                        f"({why}):\n{err[-2000:]}", pytrace=False)
    for argv in [argv for argv, torchrun in commands if _should_run(argv, torchrun)]:
        run = argv + _SHRINK[argv[0]]
        try:
            code = main(run)
        except Exception:
            code = traceback.format_exc()
        out = capsys.readouterr()
        if code != 0:
            pytest.fail(f"README.md, bash block at line {line}: `dsv32 {shlex.join(argv)}` fails when run "
                        f"as `dsv32 {shlex.join(run)}` in {workdir} (exit {code}):\n"
                        f"{(out.out + out.err)[-3000:]}", pytrace=False)


# ------------------------------------------------------------------------------- docs
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """The anchor a Markdown renderer gives a heading: lower case, punctuation dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text())
    return {_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_links_stay_inside_the_repository(doc):
    for target in _LINK.findall(_FENCE.sub("", doc.read_text())):
        where, _, anchor = target.partition("#")
        path = (doc.parent / where).resolve() if where else doc
        assert "://" not in where and ROOT in path.parents or path == ROOT, \
            f"{doc.relative_to(ROOT)} links outside the repository: {target}"
        assert path.exists(), f"{doc.relative_to(ROOT)} links to a missing file: {target}"
        if anchor:
            assert anchor in _anchors(path), f"{doc.relative_to(ROOT)} links to a missing heading: {target}"


def _resolve(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as e:
            outside = e.name and not (module + ".").startswith(e.name + ".")     # a dependency is missing
            if outside and importlib.util.find_spec(module) is not None:
                return True         # it exists, but needs what this machine lacks (triton)
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("doc", DOCS[1:], ids=[str(d.relative_to(ROOT)) for d in DOCS[1:]])
def test_docs_name_code_that_exists(doc):
    names = set(re.findall(r"`(dsv32(?:\.\w+)+)", doc.read_text()))
    missing = sorted(n for n in names if not _resolve(n))
    assert names and not missing, f"{doc.relative_to(ROOT)} names code that does not exist: {missing}"


def test_nothing_points_at_the_spec_outside_the_repository():
    files = [*DOCS, *sorted((ROOT / "src").rglob("*.py"))]
    stale = [f"{f.relative_to(ROOT)}:{n}" for f in files
             for n, line in enumerate(f.read_text().splitlines(), 1) if re.search(r"\bSPEC\b|shared/SPEC", line)]
    assert not stale, f"these lines send readers to the SPEC outside the repository (use docs/math.md): {stale}"
