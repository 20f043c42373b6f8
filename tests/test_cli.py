"""The command line: help for every verb, one-line errors with exit code 2, config files,
and the generate / info / demo verbs end to end on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import dsv32
from dsv32.cli import build_parser, main
from tests.conftest import randomize_, tiny_config

VERBS = sorted(build_parser()._subparsers._group_actions[0].choices)


def test_top_level_help_lists_the_verbs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for verb in VERBS:
        assert verb in out


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert "--config" in capsys.readouterr().out


@pytest.mark.parametrize("verb", VERBS)
def test_bad_flag_is_a_one_line_error(verb, capsys):
    assert main([verb, "--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsv32: error:") and "\n" not in err and "Traceback" not in err


def test_unknown_verb(capsys):
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_generate_streams_and_reports_speed(tmp_path, capsys):
    model = randomize_(dsv32.DSV32ForCausalLM(tiny_config(vocab_size=259, index_topk=4)), seed=1)
    model.save_pretrained(tmp_path / "m")
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "Hi there", "--max-new-tokens", "6",
                 "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Hi there")
    assert "tokens/s" in captured.err


def test_generate_bad_sampling_value_leaves_no_output(capsys):
    assert main(["generate", "--model", "tiny", "--prompt", "x", "--top-p", "1.5"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "top_p" in captured.err


def test_config_file_supplies_flags_and_flags_win(tmp_path, capsys):
    cfg = tmp_path / "gen.json"
    cfg.write_text(json.dumps({"model": "tiny", "prompt": ["ab"], "max_new_tokens": 3, "temperature": 0}))
    assert main(["generate", "--config", str(cfg), "--max-new-tokens", "2"]) == 0
    assert "2 tokens" in capsys.readouterr().err
    cfg.write_text(json.dumps({"model": "tiny", "bogus_option": 1}))
    assert main(["generate", "--config", str(cfg)]) == 2
    assert "unknown option 'bogus_option'" in capsys.readouterr().err


def test_info_preset(capsys):
    assert main(["info", "v3.2"]) == 0
    assert "671.878 B main" in capsys.readouterr().out


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "dsv32", "info", "tiny"], capture_output=True, text=True)
    assert proc.returncode == 0 and "parameters" in proc.stdout
