"""GRPO steps per second: dsv32's `train_grpo` against TRL's `GRPOTrainer`, on one model.

    pip install -e '.[bench]'                              # TRL (and its accelerate / datasets)
    python benchmarks/grpo_vs_trl.py                       # 64 and 16 samples per step
    python benchmarks/grpo_vs_trl.py --samples 16 --steps 4 --repeats 1     # a smoke run

Both sides start from the same files: a tiny DeepseekV32 (the `tiny` preset widened to hidden
128: MLA, a dense layer then DeepSeekMoE with 8 routed experts, top-2; index_topk above every
length, so attention is dense for both) built and saved by transformers, and one character-level
`tokenizer.json` (printable ASCII, `</s>`, `<pad>`, no BOS: both encode a prompt to the same
ids). Same task (2-digit a + b, exact-match reward), same settings: G = 8 samples per prompt,
8 new tokens, temperature 1, top-p 0.9, one update per rollout, lr 1e-5, grad clip 1,
beta 0.01 with the unbiased KL estimate (TRL `use_bias_correction_kl`), off-policy sequence
mask delta 0.1 (TRL `off_policy_mask_threshold`), sequence-mean loss (TRL `loss_type="grpo"`),
no std scaling. dsv32 keeps its defaults for the two stabilisers TRL has no counterpart for
(keep routing, keep sampling mask): extra work on the dsv32 side.

Each engine runs in its own process (one thread: ops this small lose to OpenMP's barriers on a
shared machine), first `--warmup` steps untimed, then `--steps` timed ones; a step is rollout +
reward + reference pass + update. Processes alternate dsv32 / TRL `--repeats` times; the table
shows medians over repeats of each process's median step time (wall and CPU time: see
StepClock), and the ratios of those. samples/s = samples per step / step time; tokens/s counts
generated completion tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
G, NEW_TOKENS, TOP_P, BETA, DELTA, LR = 8, 8, 0.9, 0.01, 0.1, 1e-5
SPECIALS = ["</s>", "<pad>"]


def prepare(folder: Path) -> None:
    """Save the transformers model and the tokenizer files both engines load."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from dsv32 import ModelConfig

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {c: i for i, c in enumerate(chars + SPECIALS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "pad_token": "<pad>",
         "bos_token": None, "model_max_length": 256}))
    eos, pad = vocab["</s>"], vocab["<pad>"]
    cfg = ModelConfig.preset("tiny", hidden_size=128, index_topk=64, max_position_embeddings=256, rope_scaling=None,
                             vocab_size=len(vocab), bos_token_id=None, eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(0)
    hf = transformers.DeepseekV32ForCausalLM(transformers.DeepseekV32Config.from_dict(cfg.to_hf_config()))
    hf.generation_config.eos_token_id = eos
    hf.generation_config.pad_token_id = pad
    hf.save_pretrained(folder)


def examples(n: int):
    from dsv32.rl import task_examples
    return task_examples("arithmetic", n, seed=0, options={"digits": 2, "ops": "+"})


class StepClock:
    """Both engines call the reward once per sample (dsv32) or once per batch (TRL) each step,
    between rollout and update: the interval between consecutive steps' first calls is one whole
    step (update + next rollout), in wall time and in this process's CPU time (the load of a
    shared machine inflates the first more than the second)."""

    def __init__(self):
        self.marks: list[tuple[float, float]] = []

    def mark(self) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    def steps(self, warmup: int) -> dict:
        wall = [b[0] - a[0] for a, b in zip(self.marks, self.marks[1:])][warmup:]
        cpu = [b[1] - a[1] for a, b in zip(self.marks, self.marks[1:])][warmup:]
        return {"wall": statistics.median(wall), "cpu": statistics.median(cpu)}


def run_dsv32(folder: Path, samples: int, warmup: int, steps: int) -> dict:
    from dsv32.checkpoint import load_pretrained
    from dsv32.rl import GRPOConfig, task_reward, train_grpo
    from dsv32.tokenizer import load_tokenizer

    model = load_pretrained(folder)
    tok = load_tokenizer(folder)
    clock, calls, score = StepClock(), [0], task_reward("arithmetic")

    def reward(prompt, completion, example):
        if calls[0] % samples == 0:
            clock.mark()
        calls[0] += 1
        return score(prompt, completion, example)

    cfg = GRPOConfig(steps=warmup + steps + 1, prompts_per_step=samples // G, group_size=G,
                     max_new_tokens=NEW_TOKENS, top_p=TOP_P, beta=BETA, kl_estimator="unbiased", delta=DELTA,
                     lr=LR, grad_clip=1.0)
    history = train_grpo(model, tok, examples(4096), cfg, reward_fns=reward, show_progress=False)
    tokens = statistics.mean(r["response_length"] * samples for r in history[warmup:])
    return {**clock.steps(warmup), "tokens_per_step": tokens}


def run_trl(folder: Path, samples: int, warmup: int, steps: int) -> dict:
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from dsv32.rl import task_reward

    data = examples(4096)
    by_prompt = {ex.prompt: ex for ex in data}
    score = task_reward("arithmetic")
    clock, generated = StepClock(), []

    def reward(prompts, completions, completion_ids, **_):
        clock.mark()
        generated.append(sum(len(c) for c in completion_ids))
        return [score(p, c, by_prompt[p]) for p, c in zip(prompts, completions)]

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_bench_"), per_device_train_batch_size=samples, num_generations=G,
        max_completion_length=NEW_TOKENS, temperature=1.0, top_p=TOP_P, beta=BETA, use_bias_correction_kl=True,
        off_policy_mask_threshold=DELTA, loss_type="grpo", scale_rewards="none", learning_rate=LR,
        lr_scheduler_type="constant", max_grad_norm=1.0, max_steps=warmup + steps + 1, num_iterations=1,
        logging_steps=10**6, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0,
        disable_tqdm=True, dataloader_num_workers=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_list([{"prompt": ex.prompt} for ex in data]))
    trainer.train()
    return {**clock.steps(warmup), "tokens_per_step": statistics.mean(generated[warmup:])}


def child(args) -> None:
    torch.set_num_threads(1)
    run = run_dsv32 if args.child == "dsv32" else run_trl
    print("RESULT " + json.dumps(run(Path(args.folder), args.samples[0], args.warmup, args.steps)))


def spawn(engine: str, folder: Path, samples: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, "--folder", str(folder), "--samples", str(samples),
           "--warmup", str(args.warmup), "--steps", str(args.steps)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{engine} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, nargs="+", default=[64, 16], help="samples per step (multiples of 8)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", nargs="+", default=["dsv32", "trl"], choices=["dsv32", "trl"])
    ap.add_argument("--child", choices=["dsv32", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    bad = [s for s in args.samples if s < G or s % G]
    if bad:
        ap.error(f"--samples must be multiples of G = {G}; got {bad}")
    from grpo_common import markdown_table

    folder = Path(tempfile.mkdtemp(prefix="grpo_vs_trl_"))
    prepare(folder)
    print(f"load: {os.getloadavg()[0]:.2f} (1-min average) at start", flush=True)
    rows = []
    for samples in args.samples:
        runs: dict[str, list[dict]] = {e: [] for e in args.engines}
        for _ in range(args.repeats):
            for engine in args.engines:
                runs[engine].append(spawn(engine, folder, samples, args))
                print(f"  {samples} samples/step {engine}: {runs[engine][-1]}", flush=True)
        cells = [str(samples)]
        rate = {}
        for engine in args.engines:
            wall = statistics.median(r["wall"] for r in runs[engine])
            cpu = statistics.median(r["cpu"] for r in runs[engine])
            tokens = statistics.median(r["tokens_per_step"] for r in runs[engine])
            rate[engine] = (samples / wall, samples / cpu)
            cells += [f"{wall * 1e3:.0f} / {cpu * 1e3:.0f}", f"{samples / wall:.0f} / {samples / cpu:.0f}",
                      f"{tokens / wall:.0f} / {tokens / cpu:.0f}"]
        if len(rate) == 2:
            cells.append(" / ".join(f"{a / b:.2f}x" for a, b in zip(rate["dsv32"], rate["trl"])))
        rows.append(cells)
    headers = ["samples/step"]
    for engine in args.engines:
        headers += [f"{engine} ms/step", f"{engine} samples/s", f"{engine} tokens/s"]
    if len(args.engines) == 2:
        headers.append("dsv32 / TRL")
    print("each cell: wall / CPU time (medians)")
    print(f"load: {os.getloadavg()[0]:.2f} (1-min average) at end")
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
