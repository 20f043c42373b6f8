"""dsv32 against transformers' DeepseekV32ForCausalLM on one DSA model: a training step at
long context, and long-context generation (prefill time, decode tokens/s, peak memory).

    pip install -e '.[bench]'
    python benchmarks/vs_transformers.py                        # train T = 2K 4K 8K; generate L = 4K 16K
    python benchmarks/vs_transformers.py --train 1024 --generate 1024 --new-tokens 8 --reps 1   # a smoke run
    python benchmarks/vs_transformers.py --config wide --train --generate 4096 16384 --new-tokens 16

One model, saved once in the Hugging Face layout by dsv32 and loaded by both libraries: the
`small` preset (4 layers, 4 heads, DSA with index_topk 256, DeepSeekMoE), float32, random
weights (seeded); `--config wide` / `many-heads` change it into a model whose decode cost is
attention over the cache, not per-token fixed work (see CONFIGS).
Every measurement runs in a fresh process (peak RSS is that process's),
dsv32 and transformers alternating; one thread each.

Training step: forward (sparse attention through the indexer's top-k; transformers' eager
implementation masks its dense scores to the same top-k), LM loss, backward and one AdamW step
on a batch of one random sequence of T tokens; median of `--reps` steps after one warm-up.
The indexer gets no gradient in either (its top-k is not differentiable; dsv32 trains it with
a separate loss, not timed here).

Generation: greedy, one random prompt of L tokens, `--new-tokens` new tokens. Prefill = time
to the first token; decode tokens/s over the following ones; both in wall and in the process's
CPU time (a shared machine's load inflates wall time); peak RSS of the process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))


# name -> (overrides of the `small` preset, transformers' attention implementation).
# `wide`: V3.2's per-head dims (latent 512 + 64, heads 128 + 64 / 128, indexer keys 128) at 4
# heads and 2 layers: attention over the cache is most of a decode step, and transformers still
# fits L=16K in memory (its attention materialises (heads, L, L) float32 scores per layer: 4 GiB
# at 4 heads).
# `many-heads`: 32 heads, 2 layers, small dims; transformers (SDPA, whose masked CPU path also
# materialises the scores) runs it to L=4K only -- at 16K it asks for 32 GiB.
CONFIGS = {
    "small": ({}, "eager"),
    "wide": (dict(hidden_size=256, num_hidden_layers=2, q_lora_rank=256, kv_lora_rank=512, qk_nope_head_dim=128,
                  qk_rope_head_dim=64, v_head_dim=128, index_head_dim=128), "eager"),
    "many-heads": (dict(num_attention_heads=32, num_hidden_layers=2), "sdpa"),
}


def prepare(folder: Path, max_len: int, config: str) -> None:
    from dsv32 import DSV32ForCausalLM, ModelConfig
    from dsv32.checkpoint import save_pretrained

    cfg = ModelConfig.preset("small", **CONFIGS[config][0], max_position_embeddings=max_len)
    model = DSV32ForCausalLM(cfg)
    model.init_weights(seed=0)
    save_pretrained(model, folder)


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def load(engine: str, folder: Path, attn: str = "eager"):
    if engine == "dsv32":
        from dsv32.checkpoint import load_pretrained
        return load_pretrained(folder)
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config._attn_implementation = attn
    return model


def train_step(engine: str, folder: Path, T: int, reps: int) -> dict:
    model = load(engine, folder).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = tokens(T, 1)
    if engine == "dsv32":
        from dsv32 import AttentionOptions
        from dsv32.training.losses import lm_loss
        sparse = AttentionOptions(sparse=True)

        def loss():
            return lm_loss(model(ids, attention=sparse).logits, ids)[0]
    else:
        def loss():
            return model(input_ids=ids, labels=ids).loss

    wall, cpu = [], []
    for i in range(reps + 1):
        t, c = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
        if i:                                         # the first step warms up
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu)}


@torch.no_grad()
def generate(engine: str, folder: Path, L: int, new: int, attn: str = "eager") -> dict:
    model = load(engine, folder, attn).eval()
    prompt = tokens(L, 2)
    marks: list[tuple[float, float]] = []          # (wall, CPU) after each new token's forward
    start = (time.perf_counter(), time.process_time())
    if engine == "dsv32":
        from dsv32.inference import generate as dsv32_generate
        dsv32_generate(model, prompt.tolist(), max_new_tokens=new, temperature=0.0, stop_tokens=[],
                       stream=lambda *_: marks.append((time.perf_counter(), time.process_time())))
    else:
        import transformers

        class Clock(transformers.LogitsProcessor):     # called once per new token, after its forward
            def __call__(self, input_ids, scores):
                marks.append((time.perf_counter(), time.process_time()))
                return scores

        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, logits_processor=[Clock()], pad_token_id=0)
    n = len(marks) - 1
    return {"prefill": marks[0][0] - start[0], "decode": n / (marks[-1][0] - marks[0][0]),
            "prefill_cpu": marks[0][1] - start[1], "decode_cpu": n / (marks[-1][1] - marks[0][1]),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def child(args) -> None:
    torch.set_num_threads(1)
    folder = Path(args.folder)
    out = train_step(args.child, folder, args.size, args.reps) if args.mode == "train" else \
        generate(args.child, folder, args.size, args.new_tokens, CONFIGS[args.config][1])
    print("RESULT " + json.dumps(out))


def spawn(engine: str, mode: str, size: int, folder: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, "--mode", mode, "--size", str(size), "--folder", str(folder),
           "--reps", str(args.reps), "--new-tokens", str(args.new_tokens), "--config", args.config]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{engine} {mode} {size} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    print(f"  {mode} {size} {engine}: {result}", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, nargs="*", default=[2048, 4096, 8192], help="training lengths T")
    ap.add_argument("--generate", type=int, nargs="*", default=[4096, 16384], help="prompt lengths L")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3, help="timed training steps per process")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small",
                    help="the model: the `small` preset or a variant of it (see CONFIGS)")
    ap.add_argument("--child", choices=["dsv32", "transformers"], help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["train", "generate"], help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    from grpo_common import markdown_table

    folder = Path(tempfile.mkdtemp(prefix="vs_transformers_"))
    prepare(folder, max([256, *args.train, *(L + args.new_tokens for L in args.generate)]), args.config)
    print(f"config {args.config}; load: {os.getloadavg()[0]:.2f} (1-min average) at start", flush=True)
    engines = ["dsv32", "transformers"]
    tables = []
    if args.train:
        rows = []
        for T in args.train:
            r = {e: spawn(e, "train", T, folder, args) for e in engines}
            a, b = r["dsv32"], r["transformers"]
            rows.append([str(T), f"{a['wall']:.2f} / {a['cpu']:.2f}", f"{b['wall']:.2f} / {b['cpu']:.2f}",
                         f"{b['wall'] / a['wall']:.2f}x / {b['cpu'] / a['cpu']:.2f}x"])
        tables.append("Training step (forward, backward, AdamW), batch 1; seconds, wall / CPU:\n\n" + markdown_table(
            ["T", "dsv32 s", "transformers s", "dsv32 speed-up"], rows))
    if args.generate:
        rows = []
        for L in args.generate:
            r = {e: spawn(e, "generate", L, folder, args) for e in engines}
            a, b = r["dsv32"], r["transformers"]
            gib = 2.0 ** 30
            cells = [str(L)]
            for key, fmt, faster in (("prefill", ".2f", "lower"), ("prefill_cpu", ".2f", "lower"),
                                     ("decode", ".1f", "higher"), ("decode_cpu", ".1f", "higher")):
                gain = b[key] / a[key] if faster == "lower" else a[key] / b[key]
                cells.append(f"{a[key]:{fmt}} / {b[key]:{fmt}} ({gain:.1f}x)")
            rows.append(cells + [f"{a['peak_rss'] / gib:.2f} / {b['peak_rss'] / gib:.2f}"])
        tables.append(f"Greedy generation, {args.new_tokens} new tokens (dsv32 / transformers, speed-up):\n\n"
                      + markdown_table(["L", "prefill s (wall)", "prefill s (CPU)", "decode tokens/s (wall)",
                                        "decode tokens/CPU s", "peak RSS GiB"], rows))
    print(f"load: {os.getloadavg()[0]:.2f} (1-min average) at end")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
