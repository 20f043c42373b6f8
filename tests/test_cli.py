"""The command line: help for every verb, one-line errors with exit code 2, config files,
and the generate / info / demo verbs end to end on tiny models."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import pytest

import dsv32
from dsv32.cli import build_parser, main
from tests.conftest import tiny_model

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
    model = tiny_model(seed=1, vocab_size=259, index_topk=4)
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


def _verb_args(argv: list[str]):
    from dsv32.cli import _apply_config, build_parser
    parser = build_parser()
    return _apply_config(parser._subparsers._group_actions[0].choices[argv[0]], argv[1:])


def test_every_verb_with_a_config_dataclass_has_its_fields_as_flags(tmp_path):
    import dataclasses

    from dsv32.cli import config_from_args
    from dsv32.rl.grpo import GRPOConfig
    from dsv32.rl.sft import SFTConfig
    from dsv32.training.trainer import TrainConfig
    for verb, cls in (("pretrain", TrainConfig), ("sparsify", TrainConfig), ("sft", SFTConfig),
                      ("grpo", GRPOConfig)):
        args = _verb_args([verb])
        assert {f.name for f in dataclasses.fields(cls)} - set(vars(args)) <= {"lr_overrides"}, verb
        config_from_args(args, cls)                     # the verb's defaults are valid settings
    # Per-verb defaults, the historical short names, and --no-NAME for booleans.
    assert (_verb_args(["pretrain"]).steps, _verb_args(["sparsify"]).steps) == (1000, 200)
    args = _verb_args(["pretrain", "--bias-gamma", "0.5", "--keep", "3", "--no-progress", "--betas", "0.8", "0.9"])
    config = config_from_args(args, TrainConfig)
    assert (config.bias_update_gamma, config.keep_checkpoints, config.progress, config.betas) == (0.5, 3, False,
                                                                                                  (0.8, 0.9))
    # Config-file keys may be any flag name, the short ones included.
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"bias_gamma": 0.25, "keep": 2, "no_progress": True, "keep_checkpoints": 2}))
    config = config_from_args(_verb_args(["sparsify", "--config", str(path)]), TrainConfig)
    assert (config.bias_update_gamma, config.keep_checkpoints, config.progress) == (0.25, 2, False)


# ------------------------------------------------------------------ help and info (issue 13)
def _actions():
    parser = build_parser()
    yield "dsv32", parser
    for verb, sub in parser._subparsers._group_actions[0].choices.items():
        yield verb, sub


def test_every_flag_of_every_verb_has_help_and_shows_its_default():
    # Issue 13: --steps, --warmup-steps, --device, --log-every, --seed showed no help or default.
    missing = []
    for verb, parser in _actions():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            text = formatter._get_help_string(action)
            if not (action.help or "").strip():
                missing.append(f"{verb} {action.dest}: no help")
            elif action.option_strings and not action.required and "default" not in text.lower():
                missing.append(f"{verb} {action.option_strings[0]}: no default shown")
    assert not missing, missing


def test_help_output_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--steps STEPS optimizer steps in the whole run (default: 1000)" in out
    assert "--seed SEED seeds the weights, the data order and the trainer (default: 0)" in out


def test_info_prints_sizes_in_m_or_b_as_fits(tmp_path, capsys):
    # Issue 13: `dsv32 info tiny` printed "0.000 B".
    assert main(["info", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "0.000 B" not in out and re.search(r"parameters: \d+\.\d\d M main", out)
    assert main(["info", "v3.2"]) == 0
    assert "671.878 B main" in capsys.readouterr().out
    path = tmp_path / "cfg.json"                 # a config.json file works too
    path.write_text(json.dumps(tiny_model().config.to_hf_config()))
    assert main(["info", str(path)]) == 0 and "hidden 48" in capsys.readouterr().out
