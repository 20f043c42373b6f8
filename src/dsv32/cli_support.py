"""What every `dsv32` verb shares around its handler: the help formatter (every flag shows its
default), the checks made before a verb runs (device, output folders), and the one-line report
of an error with its exit code (see cli.py's docstring).

    exit 2   UserError, ValueError (CheckpointError included), a missing file, a path that
             cannot be used (a file where a folder belongs, permission denied)
    exit 1   out of disk space, a diverged or NaN loss or NaN logits (FloatingPointError), and
             anything unexpected; for the training verbs the message says which checkpoint of
             the run is intact

Left out: retrying anything; a failure is reported, the run resumes with --resume.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from .checkpoint import CheckpointError

# The verbs that shard their model under torchrun (FSDP2, DCP checkpoints, rank-0 reporting);
# every other verb works on one process and refuses a multi-process launch. They are also the
# verbs with a run folder whose checkpoints a failure report names.
DISTRIBUTED_VERBS = ("pretrain", "sparsify", "sft", "grpo")


class UserError(ValueError):
    """A mistake in what the user asked for; reported in one line, exit code 2 (a ValueError, so
    that callers of the Python API catch it like every other bad value)."""


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.required or action.default is argparse.SUPPRESS \
                or "default" in text.lower():
            return text
        default = action.default
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            shown = "on" if default else "off"
        elif isinstance(default, (list, tuple)):
            shown = ",".join(map(str, default)) if default else "none"
        else:
            shown = "none" if default is None else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()


def human_count(n: int) -> str:
    """A parameter count in B (>= 1e9, three decimals) or M (two): '671.878 B', '0.62 M'."""
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def check_device(name: str, flag: str = "--device") -> None:
    """A device torch knows and this machine has."""
    import torch
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"{flag} {name!r} is not a device ({str(e).splitlines()[0]})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UserError(f"{flag} {name}: dsv32 runs on cpu or cuda")


def check_output_dir(path: str | Path, flag: str) -> None:
    """An output folder that is not a file and whose nearest existing folder is writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; choose another path")
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, so no folder can be made there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {existing} is not writable")


# Flags that name an output folder, per argparse dest.
_OUTPUTS = {"out": "--out", "dst": "dst"}


def check_args(args: argparse.Namespace) -> None:
    """The checks every verb shares, before anything is loaded or written."""
    if isinstance(getattr(args, "device", None), str):
        check_device(args.device)
    for dest, flag in _OUTPUTS.items():
        if getattr(args, dest, None):
            check_output_dir(getattr(args, dest), flag)


def _what_was_kept(args: argparse.Namespace | None) -> str:
    """For a failure message: the newest complete checkpoint of the run, if the verb has one."""
    out = getattr(args, "out", None)
    if getattr(args, "verb", None) == "convert":
        return f"; {args.dst} is as it was (convert installs its files only when all are written)"
    if args is None or getattr(args, "verb", None) not in DISTRIBUTED_VERBS or not out:
        return ""
    from .training.checkpointing import CheckpointFolder
    latest = CheckpointFolder(Path(out) / "checkpoints").latest()
    return f"; checkpoint {latest} is intact" if latest else f"; no checkpoint was written to {out}"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _is_out_of_disk(e: BaseException) -> bool:
    return (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(e)


def format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line, like an error (`warnings.formatwarning`'s signature)."""
    return f"dsv32: warning: {' '.join(str(message).split())}\n"


def describe_error(e: Exception, args: argparse.Namespace | None) -> tuple[int, str]:
    """(exit code, one line) for an error that reached the top."""
    if _is_out_of_disk(e):
        where = f" writing {getattr(args, 'dst', None) or e.filename}" if getattr(e, "filename", None) else ""
        return 1, f"out of disk space{where}{_what_was_kept(args)}"
    if isinstance(e, (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return 2, f"cannot use {e.filename or 'a path'}: {e.strerror or _one_line(e)}"
    if isinstance(e, (UserError, CheckpointError, ValueError, FileNotFoundError)):
        return 2, _one_line(e)
    if isinstance(e, ArithmeticError):       # FloatingPointError: a diverged loss, NaN logits
        return 1, f"{_one_line(e)}{_what_was_kept(args)}"
    return 1, f"{type(e).__name__}: {_one_line(e)}{_what_was_kept(args)} (run with --debug for the traceback)"


