"""What keep selection changes at identical weights, and what it costs.

    python benchmarks/keep_selection.py                 # ~1 min on one CPU core

A random `tiny`-preset model (hidden 128, 2 layers) with DSA top-k 16 samples completions of
~36-token arithmetic prompts, as GRPO's rollout does (cached, optionally chunked prefill,
optionally over the simulated FP8 latent cache); the training forward then recomputes the
log-probs one-shot, replaying the recorded selection (keep selection) or selecting afresh.

Columns: mismatch = mean and max |log pi_theta - log pi_old| over completion tokens at
identical weights, without replay, with the completion's selection replayed (keep selection,
GRPO's default) and with the prompt's too (keep_prompt_selection); completion flips = share of
(layer, completion query) selections the training forward would choose differently from the
sampler; prompt flips = the same for the prompt queries that have a choice. Then the recorded
bytes per completion token.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grpo_common import TOKENIZER, build_model, markdown_table, set_threads  # noqa: E402

from dsv32 import Records  # noqa: E402
from dsv32.inference import LatentCache  # noqa: E402
from dsv32.rl import collect_rollout, policy_logprobs, task_examples  # noqa: E402


def prompt_flips(model, rollout, chunk: int | None, fp8: bool) -> tuple[int, int]:
    """(differing, compared) selections of real prompt queries: a prefill over the cache in chunks
    of `chunk` (the sampler's) against the one-shot training forward."""
    P = rollout.prompt_len
    ids, mask = rollout.sequences[:, :P], rollout.attention_mask[:, :P]
    cache, parts = LatentCache(model.config, fp8=fp8), {}
    size = chunk or P
    for c0 in range(0, P, size):
        out = model(ids[:, c0:c0 + size], attention_mask=mask[:, c0:c0 + size], cache=cache,
                    records=Records(record_indices=True))
        for layer, idx in out.indices.items():
            parts.setdefault(layer, []).append(idx)
    full = model(ids, attention_mask=mask, records=Records(record_indices=True)).indices
    differ = total = 0
    for layer, chunks in parts.items():
        K = max(c.shape[-1] for c in chunks)
        sampled = torch.cat([torch.nn.functional.pad(c, (0, K - c.shape[-1]), value=-1) for c in chunks], 1)
        a, b = sampled.sort(-1).values, torch.nn.functional.pad(full[layer], (0, K - full[layer].shape[-1]),
                                                                 value=-1).sort(-1).values
        real = mask & (torch.arange(P) >= model.config.index_topk)       # queries that have a choice
        differ += int((a != b).any(-1)[real].sum())
        total += int(real.sum())
    return differ, total


def completion_flips(model, rollout) -> tuple[int, int]:
    """(differing, compared) selections at the recorded completion queries."""
    P, N = rollout.prompt_len, rollout.completion_mask.shape[1]
    full = model(rollout.sequences[:, :P + N - 1], attention_mask=rollout.attention_mask[:, :P + N - 1],
                 records=Records(record_indices=True)).indices
    differ = total = 0
    for layer, rec in rollout.selection.items():
        mine = full[layer][:, P - 1:]
        K = max(rec.shape[-1], mine.shape[-1])
        a = torch.nn.functional.pad(rec, (0, K - rec.shape[-1]), value=-1).sort(-1).values
        b = torch.nn.functional.pad(mine, (0, K - mine.shape[-1]), value=-1).sort(-1).values
        real = rollout.completion_mask & (rec >= 0).any(-1)
        differ += int((a != b).any(-1)[real].sum())
        total += int(real.sum())
    return differ, total


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index-topk", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    set_threads(1)
    model = build_model(args.seed, index_topk=args.index_topk)
    examples = task_examples("arithmetic", args.prompts, seed=args.seed, options={"digits": 2})
    seeds = list(range(args.prompts * args.group_size))
    rows = []
    for fp8 in (False, True):
        for chunk in (None, 5, 1):
            r = collect_rollout(model, TOKENIZER, examples, group_size=args.group_size,
                                max_new_tokens=args.max_new_tokens, temperature=1.0, seeds=seeds,
                                record_selection=True, record_prompt_selection=True, fp8_cache=fp8,
                                prefill_chunk=chunk)
            gaps = {}
            for keep in ("none", "completion", "all"):
                logp, _, _ = policy_logprobs(model, r, temperature=1.0, keep_selection=keep != "none",
                                             keep_prompt_selection=keep == "all")
                gaps[keep] = (logp - r.logp_old)[r.completion_mask].abs()
            cd, ct = completion_flips(model, r)
            pd, pt = prompt_flips(model, r, chunk, fp8)
            rows.append(["fp8" if fp8 else "fp32", str(chunk or "one-shot"),
                         *(f"{gaps[k].mean():.1e} / {gaps[k].max():.1e}" for k in ("none", "completion", "all")),
                         f"{cd}/{ct}", f"{pd}/{pt}"])
    cfg = model.config
    print(markdown_table(["sampler cache", "prefill chunk", "mismatch, not kept (mean / max)",
                          "completion kept", "prompt kept too", "completion flips", "prompt flips"], rows))
    completion = sum(s.numel() * 4 for s in r.selection.values())
    print(f"\nrecorded: {cfg.num_hidden_layers} layers x K {args.index_topk} x 4 B = "
          f"{cfg.num_hidden_layers * args.index_topk * 4} B per position; last rollout ({r.size} rows, prompt "
          f"{r.prompt_len}, completion {r.completion_mask.shape[1]} positions): completion {completion} B, "
          f"prompt too {r.selection_bytes} B")


if __name__ == "__main__":
    main()
