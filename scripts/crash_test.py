"""Fault injection: SIGKILL `dsv32 pretrain`, `sparsify`, `sft` and `grpo` at random moments,
resume each, and check that the per-step metrics equal those of an uninterrupted run exactly.

    python scripts/crash_test.py                      # the full run: 6 kills per verb (24 in all)
    python scripts/crash_test.py --small              # one kill per verb, inside its last save (make test)

For each verb (tiny model, CPU, seconds a run): one uninterrupted reference run, then trials.
A trial is a fresh run folder that is launched, killed, relaunched (with `--resume` once a
checkpoint exists; `grpo` resumes by itself), killed again ... and finally run to the end; its
metrics file must then hold the reference's records, every field equal (timings aside: step_s,
tokens_per_s, *_seconds), and no temporary file or folder may be left in it. Each kill is one of

    save    the launch is told to pause inside the save of a chosen checkpoint (models written,
            trainer state not yet: `DSV32_PAUSE_IN_SAVE`, see dsv32.training.checkpointing) and
            is killed there: the worst moment, hit every time
    start   the launch is killed after a random delay, up to the time the reference took to
            log its first step (start-up, data, resume, the first step)
    run     the launch is killed a random delay after it logged its first step, up to the time
            its remaining steps took in the reference

Random kills land wherever the run is (a step, a log line, a save) and are classified by what
they left: a temporary checkpoint folder (inside a save), records of steps past the checkpoint
the launch started from (mid-run), or neither (before its first step). A run that ended before
its kill counts no kill. Moments are drawn one third each.

Prints a table (per verb: trials, kills by moment, launches, records compared, result) and exits
1 if any trial differs. Everything is written under --work (a temporary folder by default).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = multiprocessing.get_context("forkserver")
TIMINGS = ("step_s", "tokens_per_s")
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def write_corpus(folder: Path) -> None:
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(40):
        (folder / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(150)) + "\n")


def verbs(work: Path, steps: int, save_every: int) -> dict[str, tuple[list[str], str, bool]]:
    """verb -> (command line after `dsv32`, metrics file name, resumes with --resume)."""
    text = ["--corpus", str(work / "corpus"), "--seq-len", "256", "--tasks", "passkey", "--batch-size", "2",
            "--val-fraction", "0.2", "--warmup-steps", "1", "--log-every", "1", "--no-progress",
            "--steps", str(steps), "--save-every", str(save_every)]
    task = ["--model", "tiny", "--task", "arithmetic", "--task-options", '{"digits": 1}', "--eval-size", "0",
            "--steps", str(steps)]
    return {
        "pretrain": (["pretrain", "--model", "tiny", *text], "metrics.jsonl", True),
        "sparsify": (["sparsify", "--stage", "sparse", "--init", str(work / "pretrain" / "reference"), *text],
                     "metrics.jsonl", True),
        "sft": (["sft", *task, "--train-size", "64", "--batch-size", "4", "--warmup-steps", "1",
                 "--save-every", str(save_every)], "sft_metrics.jsonl", True),
        "grpo": (["grpo", *task, "--train-size", "16", "--prompts-per-step", "2", "--group-size", "2",
                  "--max-new-tokens", "4", "--checkpoint-every", str(save_every)], "metrics.jsonl", False),
    }


def _cli(argv: list[str], log: str, pause: str | None) -> None:
    """A run in a fresh process: `dsv32 ARGV`, its output appended to `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
    os.environ.pop("DSV32_PAUSE_IN_SAVE", None)
    if pause is not None:
        os.environ["DSV32_PAUSE_IN_SAVE"] = pause
    from tqdm import tqdm
    tqdm.set_lock(threading.RLock())   # not tqdm's default multiprocessing lock: a SIGKILL would leak its semaphore
    from dsv32.cli import main
    sys.exit(main(argv))


def launch(argv: list[str], out: Path, log: Path, pause_at: tuple[int, Path] | None = None):
    """`dsv32 ARGV --out OUT` in a new process, forked from a server that imported torch and dsv32
    once (multiprocessing's forkserver), so a launch costs no interpreter start-up."""
    proc = LAUNCHER.Process(target=_cli, args=(argv + ["--out", str(out)], str(log),
                                               None if pause_at is None else f"{pause_at[0]}:{pause_at[1]}"))
    proc.start()
    return proc


def finish(proc, log: Path) -> None:
    proc.join()
    if proc.exitcode != 0:
        sys.exit(f"a run failed (exit {proc.exitcode}); its output is in {log}:\n{log.read_text()[-3000:]}")


def checkpoint_steps(out: Path) -> list[int]:
    folder = out / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*")) if folder.is_dir() else []


def in_save(out: Path) -> bool:
    return any((out / "checkpoints").glob(".checkpoint-*")) if (out / "checkpoints").is_dir() else False


def leftovers(out: Path) -> list[str]:
    """Temporary files and folders in a finished run folder, or beside it (the HF writer's)."""
    found = [p for p in out.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]
    found += out.parent.glob(f".{out.name}.tmp*")
    return sorted(str(p.relative_to(out.parent)) for p in found)


def records(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in TIMINGS and not k.endswith("_seconds")} for r in rows]


def new_record(out: Path, metrics: str, done: int, since_ns: int) -> bool:
    """Whether this launch has logged a step past checkpoint `done` (a file written since
    `since_ns` holding such a record: the records of a killed launch, past `done`, stay in the
    file until the new launch truncates it, and that rewrite holds none)."""
    path = out / metrics
    try:
        return path.stat().st_mtime_ns >= since_ns and any(r.get("step", 0) > done for r in records(path))
    except (OSError, ValueError):                           # not there yet, or a torn line being written
        return False


def kill_once(argv: list[str], out: Path, metrics: str, *, steps: int, save_every: int, timing: tuple[float, float],
              rng: random.Random, moment: str, small: bool) -> str | None:
    """One launch of a trial, killed at a `moment`; returns where the kill landed ("save", "run",
    "start"), or None if the run ended first. timing: the reference's (seconds to its first
    record, seconds from there to the end)."""
    log = out.parent / "log.txt"
    done = (checkpoint_steps(out) or [0])[-1]
    since = time.time_ns()
    if moment == "save":
        saves = [s for s in range(done + 1, steps + 1) if s % save_every == 0 or s == steps]
        marker = out.parent / f"paused-{rng.getrandbits(32):08x}"
        # --small pauses in the last save, so that the relaunch resumes from the one before it.
        proc = launch(argv, out, log, pause_at=(saves[-1] if small else rng.choice(saves), marker))
    else:
        proc = launch(argv, out, log)

    def event() -> bool:                                   # what the kill (or its random delay) waits for
        if moment == "save":
            return marker.exists() and bool(marker.read_text())
        return moment == "start" or new_record(out, metrics, done, since)

    while not event():
        if proc.exitcode is not None:
            finish(proc, log)
            return None
        time.sleep(0.005)
    if moment != "save":
        first, rest = timing
        proc.join(timeout=rng.uniform(0.0, first if moment == "start" else rest * (steps - done) / steps))
        if proc.exitcode is not None:
            finish(proc, log)
            return None
    proc.kill()                                            # SIGKILL
    proc.join()
    if in_save(out):
        return "save"
    return "run" if new_record(out, metrics, done, since) else "start"


def kills_of(row: dict) -> int:
    return row["save"] + row["run"] + row["start"]


def run_verb(name: str, spec: tuple[list[str], str, bool], work: Path, *, kills: int, steps: int, save_every: int,
             small: bool, rng: random.Random) -> dict:
    argv, metrics, needs_resume = spec
    folder = work / name
    folder.mkdir(parents=True)
    log = folder / "log.txt"
    start, proc = time.perf_counter(), launch(argv, folder / "reference", log)
    while not new_record(folder / "reference", metrics, 0, 0) and proc.exitcode is None:
        time.sleep(0.005)
    first = time.perf_counter() - start
    finish(proc, log)
    timing = (first, time.perf_counter() - start - first)
    expected = records(folder / "reference" / metrics)
    row = {"verb": name, "trials": 0, "save": 0, "run": 0, "start": 0, "launches": 1, "records": 0,
           "equal": True, "leftovers": []}
    while kills_of(row) < kills:
        row["trials"] += 1
        out = folder / f"trial{row['trials']}"
        while kills_of(row) < kills and (checkpoint_steps(out) or [0])[-1] < steps:
            resume = needs_resume and checkpoint_steps(out)
            moment = "save" if small else rng.choice(["save", "start", "run"])
            landed = kill_once(argv + (["--resume"] if resume else []), out, metrics, steps=steps,
                               save_every=save_every, timing=timing, rng=rng, moment=moment, small=small)
            row["launches"] += 1
            if landed is not None:
                row[landed] += 1
        resume = needs_resume and checkpoint_steps(out)
        finish(launch(argv + (["--resume"] if resume else []), out, log), log)
        row["launches"] += 1
        got = records(out / metrics)
        row["records"] += len(got)
        row["equal"] &= got == expected
        row["leftovers"] += leftovers(out)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="one kill per verb, inside a save (the make-test size)")
    parser.add_argument("--kills", type=int, default=6, help="kills per verb (default 6; --small: 1)")
    parser.add_argument("--steps", type=int, default=8, help="steps of every run (default 8; --small: 4)")
    parser.add_argument("--save-every", type=int, default=2, help="checkpoint cadence (default 2)")
    parser.add_argument("--verbs", default="pretrain,sparsify,sft,grpo", help="comma-separated subset")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    # Every run on one thread (bitwise-equal results need the same thread count), dsv32 from
    # this checkout; the fork server started below inherits both.
    os.environ["OMP_NUM_THREADS"] = "1"
    sys.path.insert(0, str(ROOT / "src"))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    LAUNCHER.set_forkserver_preload(["dsv32.cli"])
    kills, steps = (1, 4) if args.small else (args.kills, args.steps)
    work = Path(args.work or tempfile.mkdtemp(prefix="dsv32-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    write_corpus(work / "corpus")
    specs = verbs(work, steps, args.save_every)
    chosen = args.verbs.split(",")
    if "sparsify" in chosen and "pretrain" not in chosen:
        chosen.insert(0, "pretrain")                     # sparsify starts from pretrain's reference run
    rng = random.Random(args.seed)
    rows = [run_verb(v, specs[v], work, kills=kills, steps=steps, save_every=args.save_every, small=args.small,
                     rng=rng) for v in chosen]
    print("| verb | steps | trials | kills in a save | kills mid-run | kills before the first step | launches | "
          "records compared | metrics equal | leftovers |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['verb']} | {steps} | {r['trials']} | {r['save']} | {r['run']} | {r['start']} | {r['launches']} | "
              f"{r['records']} | {'yes' if r['equal'] else 'NO'} | {len(r['leftovers'])} |")
    total = sum(map(kills_of, rows))
    ok = all(r["equal"] and not r["leftovers"] for r in rows)
    print(f"{total} kills, {'every resumed run equals its uninterrupted run' if ok else 'FAILED'} (work: {work})")
    for r in rows:
        for path in r["leftovers"]:
            print(f"left behind: {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
