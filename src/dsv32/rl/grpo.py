"""The GRPO loop with the DeepSeek-V3.2 stabilisers (docs/math.md §10).

Each step:

    1. take `prompts_per_step` examples from the dataset (seeded shuffle, resumable);
    2. roll out G = `group_size` completions per prompt with the current policy, which is pi_old
       (`dsv32.inference.generate`: temperature / top-k / top-p, per-row seeds), recording
       log-probs, kept sets and expert routing;
    3. score them with the reward functions and take group advantages A_i = R_i - mean_group R;
    4. pi_ref log-probs from the frozen reference (a copy of the initial policy), once;
    5. `ppo_epochs` passes over the B = prompts * G sequences in `minibatches` shuffled
       mini-batches, one AdamW step (after gradient clipping) each. Every update after the first
       sees data sampled by an older policy: this is what makes GRPO off-policy, and what the
       clip, the off-policy mask and the unbiased KL are for;
    6. one metrics record per step (JSONL), a checkpoint every `checkpoint_every` steps
       (`dsv32.training.checkpointing`: policy, reference, optimizer, data position, RNG).

The stabilisers, each switchable: `kl_estimator` "unbiased" (eq. 7) or "k3" (with `beta` > 0),
`delta` (off-policy sequence mask; None = off), `keep_routing`, `keep_sampling_mask` (see
`dsv32.rl.replay`, which also says what pi_old is when the sampling mask is off), and
`keep_selection`, DSA's analogue of keep routing: the policy and reference passes attend to
the key slots the sampler's indexer selected for each completion token. V3.2 does not list it,
but it is on by default for the reason keep routing is: a top-k decision flipped between the
sampler and the trainer trains a path that did not generate the token. It costs nothing where
every key is selected (sequences <= index_topk, nothing is recorded) and layers x K x 4 bytes
per completion token where selection bites (`selection_bytes` per rollout and
`selection_bytes_per_token` are logged). `keep_prompt_selection` (off) replays the prompt's
selections too, for samplers whose numerics differ from the trainer's (see `dsv32.rl.replay`).

Metrics per step: reward_mean, reward_std (mean within-group), accuracy (task scorer, sampled
completions), zero_std_frac, reward_failures and reward_failures/NAME per reward function (calls
that raised, timed out or returned NaN/inf/an overflow/a non-number), response_length,
truncated_frac; averaged over the step's updates: loss, pg_objective, kl (kl_mean), clip_frac,
masked_frac, kl_old_theta, ratio_mean, entropy, grad_norm; ratio_max / ratio_min over all
updates; with keep selection, selection_bytes (the recorded selection of this rank's rollout)
and selection_bytes_per_token (per completion position: layers x K x 4, more with
keep_prompt_selection); mismatch, the mean |log pi_theta - log pi_old| at the step's first
update, where the weights are still the sampler's — any deviation there is sampler/trainer
mismatch, not learning; eval_accuracy (greedy, held-out) every `eval_every` steps;
rollout_seconds (sampling and scoring) and update_seconds (reference pass and updates).

Randomness is a function of (seed, step): the prompt order, the rollout seeds and the
mini-batch order, so a resumed run repeats an uninterrupted one exactly.

Under torchrun (`dist` with world size > 1) the policy and the reference are sharded with
FSDP2; each rank rolls out, scores and trains on its contiguous share of the step's prompts
(whole groups, so advantages stay local; row seeds are those of the global batch), FSDP2
averages the gradients, logged numbers are averaged over ranks, and checkpoints are gathered
to rank 0 in the single-process format (so they resume at any world size).

A run whose `out_dir` holds a checkpoint resumes from it, after checking that the run's
settings (every `GRPOConfig` field and `run_info`) and model configs are those of the
checkpoint; `checkpointing.MAY_CHANGE_ON_RESUME` lists those that may change (more `steps`
extend a finished run; checkpoint and evaluation cadence).

Left out on purpose: a learning-rate schedule (RL fine-tuning here uses a constant rate),
the auxiliary-loss-free router bias update (the bias stays as loaded), separate rollout and
training engines, and reward models — see `dsv32.rl.rewards`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..model import DSV32ForCausalLM
from ..tokenizer import Tokenizer
from ..tasks import Example
from ..validation import check_bool, check_choice, check_int, check_number, is_number, require
from .advantages import group_advantages
from .datasets import PromptSampler
from .losses import AGGREGATIONS, KL_ESTIMATORS, grpo_loss
from .replay import policy_logprobs
from .rewards import RewardFn, RewardScorer, is_correct, task_reward
from .rollout import Rollout, collect_rollout, concat_rollouts, greedy_accuracy
from ..training.checkpointing import CheckpointFolder
from ..distributed import DistInfo, all_reduce_sum, shard_model
from ..training.metrics import MetricsLog, Progress


def _opt(default: Any, help: str) -> Any:
    """A config field with the help text the command line shows (`dsv32.rl.commands`)."""
    return field(default=default, metadata={"help": help})


@dataclass
class GRPOConfig:
    """Hyper-parameters of `train_grpo`. Defaults: the V3.2 recipe with all four stabilisers on
    (the paper does not publish beta or delta; ours are sized for the small models here)."""

    steps: int = _opt(100, "rollout + update rounds")
    prompts_per_step: int = _opt(8, "prompts per rollout")
    group_size: int = _opt(8, "G, samples per prompt (>= 2)")
    max_new_tokens: int = _opt(16, "longest completion")
    temperature: float = _opt(1.0, "sampling temperature (> 0); log-probs are computed at it")
    top_k: int = _opt(0, "sampling top-k, 0 = off")
    top_p: float = _opt(1.0, "sampling top-p, 1 = off")
    sampler_fp8_cache: bool = _opt(False, "sample over the FP8 latent cache, as a production engine would")
    lr: float = _opt(1e-5, "AdamW learning rate (constant)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    grad_clip: float = _opt(1.0, "max global gradient norm")
    ppo_epochs: int = _opt(1, "passes over each rollout")
    minibatches: int = _opt(1, "updates per pass")
    eps_low: float = _opt(0.2, "clip range low side: r >= 1 - eps_low")
    eps_high: float = _opt(0.2, "clip range high side: r <= 1 + eps_high")
    beta: float = _opt(0.01, "KL weight (0: the KL is only reported)")
    kl_estimator: str = _opt("unbiased", "unbiased (V3.2 eq. 7) | k3 | none")
    delta: float | None = _opt(0.1, "off-policy mask threshold; None = no mask")
    aggregation: str = _opt("sequence_mean", "sequence_mean (the paper's) | token_mean")
    scale_by_std: bool = _opt(False, "divide advantages by the group std (V3.2 does not)")
    keep_routing: bool = _opt(True, "replay the sampler's MoE expert ids in training")
    keep_sampling_mask: bool = _opt(True, "compute pi_theta and pi_ref over the sampler's kept set")
    keep_selection: bool = _opt(True, "replay the sampler's DSA key selection for completion tokens in training")
    keep_prompt_selection: bool = _opt(False, "replay it for prompt tokens too (layers x K x 4 B per prompt "
                                              "token per sample)")
    failure_reward: float = _opt(0.0, "what a failed reward call scores")
    reward_timeout: float | None = _opt(None, "seconds one reward call may take, enforced in a worker process "
                                              "(then a failure); None = no limit, in-process")
    seed: int = _opt(0, "seeds the prompt order, rollouts and mini-batches")
    checkpoint_every: int = _opt(100, "steps between checkpoints; 0 = at the end only")
    keep_checkpoints: int = _opt(1, "checkpoints kept")
    eval_every: int = _opt(0, "steps between greedy held-out evaluations; 0 = never")

    def __post_init__(self) -> None:
        for name, low in (("steps", 1), ("prompts_per_step", 1), ("group_size", 2), ("max_new_tokens", 1),
                          ("top_k", 0), ("ppo_epochs", 1), ("minibatches", 1), ("checkpoint_every", 0),
                          ("keep_checkpoints", 1), ("eval_every", 0), ("seed", 0)):
            check_int(name, getattr(self, name), low)
        B = self.prompts_per_step * self.group_size
        require(self.minibatches <= B, "minibatches",
                f"<= prompts_per_step * group_size = {B} (each mini-batch needs a sequence)", self.minibatches)
        check_number("temperature", self.temperature, 0, low_open=True,
                     note="GRPO samples; greedy decoding has no policy gradient")
        check_number("top_p", self.top_p, 0, 1, low_open=True, note="1 = off")
        for name in ("lr", "grad_clip"):
            check_number(name, getattr(self, name), 0, low_open=True)
        for name in ("weight_decay", "beta"):
            check_number(name, getattr(self, name), 0)
        for name in ("eps_low", "eps_high"):
            check_number(name, getattr(self, name), 0, 1, low_open=True, high_open=True)
        require(self.delta is None or (is_number(self.delta) and self.delta > 0), "delta",
                "> 0, or None to switch the off-policy mask off", self.delta)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        check_number("failure_reward", self.failure_reward)
        require(self.reward_timeout is None or (is_number(self.reward_timeout) and 0 < self.reward_timeout < math.inf),
                "reward_timeout", "seconds > 0, or None for no limit", self.reward_timeout)
        for name in ("sampler_fp8_cache", "scale_by_std", "keep_routing", "keep_sampling_mask", "keep_selection",
                     "keep_prompt_selection"):
            check_bool(name, getattr(self, name))


def _rng(seed: int, step: int, purpose: str) -> int:
    """A 63-bit seed that depends only on (seed, step, purpose)."""
    return random.Random(f"grpo/{seed}/{step}/{purpose}").getrandbits(63)


@torch.no_grad()
def _reference_logprobs(reference: DSV32ForCausalLM, rollout: Rollout, cfg: GRPOConfig,
                        rows_per_pass: int) -> torch.Tensor:
    """log pi_ref (B, N) over the whole rollout, `rows_per_pass` sequences per forward pass."""
    out = torch.zeros(rollout.logp_old.shape)
    for idx in torch.arange(rollout.size).split(rows_per_pass):
        part = rollout.select(idx)
        logp, _, _ = policy_logprobs(reference, part, temperature=cfg.temperature,
                                     keep_routing=cfg.keep_routing, keep_sampling_mask=cfg.keep_sampling_mask,
                                     keep_selection=cfg.keep_selection,
                                     keep_prompt_selection=cfg.keep_prompt_selection)
        out[idx, :logp.shape[1]] = logp
    return out


def _summarise(records: list[dict[str, float]]) -> dict[str, float]:
    """One value per metric over a step's updates: extremes for ratio_max/min, else the mean."""
    out: dict[str, float] = {}
    for key in records[0]:
        values = [r[key] for r in records if key in r]
        out[key] = max(values) if key == "ratio_max" else min(values) if key == "ratio_min" \
            else sum(values) / len(values)
    return out


def _gather(rollout: Rollout, ref_logp: torch.Tensor | None,
            info: DistInfo) -> tuple[Rollout, torch.Tensor | None]:
    """Every rank's scored rows, in rank order: the global rollout the minibatches are cut from."""
    parts: list[Any] = [None] * info.world_size
    torch.distributed.all_gather_object(parts, (rollout, ref_logp))
    merged = concat_rollouts([r for r, _ in parts])
    if ref_logp is None:
        return merged, None
    N = merged.completion_mask.shape[1]
    return merged, torch.cat([torch.nn.functional.pad(ref, (0, N - ref.shape[1])) for _, ref in parts])


def grpo_update(policy: DSV32ForCausalLM, optimizer: torch.optim.Optimizer, rollout: Rollout,
                ref_logp: torch.Tensor | None, cfg: GRPOConfig, step: int,
                dist: DistInfo | None = None) -> dict[str, float]:
    """`ppo_epochs` x `minibatches` clipped-surrogate updates on one scored rollout.

    rollout: with `advantages` set (B,); ref_logp: (B, N) log pi_ref, or None without a KL.
    Returns the update metrics of this step (see the module docstring).

    The minibatches are cut from one seeded permutation of the global batch, whatever the world
    size: under torchrun every rank holds the whole (gathered) rollout and trains on its equal,
    contiguous share of each minibatch, so the gradient FSDP averages over ranks is the
    minibatch's (with token_mean aggregation each share is weighted by its token count).
    """
    assert rollout.advantages is not None, "score the rollout before updating on it"
    info = dist or DistInfo()
    gen = torch.Generator().manual_seed(_rng(cfg.seed, step, "minibatches"))
    rows = -(-rollout.size // cfg.minibatches)
    if info.enabled and (rollout.size % cfg.minibatches or rows % info.world_size):
        raise ValueError(f"prompts_per_step x group_size = {rollout.size} rows must split into {cfg.minibatches} "
                         f"minibatches whose size is divisible by the world size {info.world_size}")
    share = rows // info.world_size
    # The optimizer's own parameter objects: under FSDP2, `policy.parameters()` taken between a
    # forward and its backward can name the root's transient unsharded tensors instead, which then
    # never receive a gradient (the norm and the clipping would leave those parameters out).
    params = [p for group in optimizer.param_groups for p in group["params"]]
    records: list[dict[str, float]] = []
    skipped = 0
    policy.train()
    for _ in range(cfg.ppo_epochs):
        for idx in torch.randperm(rollout.size, generator=gen).split(rows):
            if info.enabled:
                idx = idx[info.rank * share:(info.rank + 1) * share]
            mb = rollout.select(idx)
            logp, logits, kept = policy_logprobs(policy, mb, temperature=cfg.temperature,
                                                 keep_routing=cfg.keep_routing,
                                                 keep_sampling_mask=cfg.keep_sampling_mask,
                                                 keep_selection=cfg.keep_selection,
                                                 keep_prompt_selection=cfg.keep_prompt_selection)
            ref = None if ref_logp is None else ref_logp[idx, :logp.shape[1]]
            loss, m = grpo_loss(logp, mb.logp_old, mb.advantages, mb.completion_mask, logp_ref=ref,
                                eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta,
                                kl_estimator=cfg.kl_estimator, delta=cfg.delta, aggregation=cfg.aggregation,
                                logits=logits.detach(), kept=kept)
            if info.enabled and cfg.aggregation == "token_mean":
                tokens = mb.completion_mask.sum().float()
                loss = loss * (tokens * info.world_size / all_reduce_sum(tokens, info).clamp(min=1))
            if not records:
                valid = mb.completion_mask
                gap = (logp.detach() - mb.logp_old).abs()
                m["mismatch"] = torch.where(valid, gap, 0).sum() / valid.sum().clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            # Under FSDP2 the norm is a replicated DTensor: its local value is the global norm.
            m["grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            # One host read for all of this update's numbers; the finiteness test needs it anyway.
            values = torch.stack([torch.as_tensor(v).detach().double().reshape(()) for v in m.values()]).tolist()
            record = dict(zip(m, values))
            if math.isfinite(record["grad_norm"]):
                optimizer.step()
            else:                # a non-finite gradient would poison AdamW's moments for good
                skipped += 1
            records.append(record)
    out = _summarise(records)
    out["kl"] = out.pop("kl_mean", None)          # None (null) without a KL estimator
    out["skipped_updates"] = skipped
    return out


def _average_over_ranks(record: dict[str, Any], info: DistInfo) -> dict[str, Any]:
    """Rank means of the numbers (extremes for ratio_max/min, sums for counts); same keys on every rank."""
    out = dict(record)
    for key in sorted(record):
        value = record[key]
        if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        t = torch.tensor([float(value)], dtype=torch.float64)
        op = {"ratio_max": torch.distributed.ReduceOp.MAX, "ratio_min": torch.distributed.ReduceOp.MIN}.get(
            key, torch.distributed.ReduceOp.SUM)
        torch.distributed.all_reduce(t, op=op)
        total = float(t)
        counted = key in ("ratio_max", "ratio_min", "skipped_updates") or key.startswith("reward_failures")
        out[key] = total if counted else total / info.world_size
    return out


def train_grpo(
    policy: DSV32ForCausalLM,
    tokenizer: Tokenizer,
    dataset: Sequence[Example],
    config: GRPOConfig,
    *,
    reward_fns: RewardFn | Sequence[RewardFn] | None = None,
    out_dir: str | Path | None = None,
    eval_examples: Sequence[Example] | None = None,
    show_progress: bool = True,
    dist: DistInfo | None = None,
    run_info: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Fine-tune `policy` in place with GRPO; returns the metrics records of the steps run.

    dataset: prompts with their answers (`dsv32.rl.datasets`). reward_fns: callables
    (prompt, completion, example) -> float, summed; default the exact-match reward of the
    dataset's task (`meta["task"]` of its first example). out_dir: where `checkpoints/` and
    `metrics.jsonl` go; a run whose out_dir holds a checkpoint resumes from it (policy,
    reference, optimizer, data position, RNG) if its settings match. eval_examples: held-out
    prompts for `eval_accuracy` (greedy) every `config.eval_every` steps. run_info: settings
    outside `config` (task, data, rewards) that a resumed run must share with its checkpoint.
    """
    cfg = config
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: give at least one example")
    if reward_fns is None:
        task = dataset[0].meta.get("task")
        if task is None:
            raise ValueError("reward_fns is required for examples from no built-in task (meta['task'] unset)")
        reward_fns = task_reward(task)
    scorer = RewardScorer(reward_fns, failure_value=cfg.failure_reward, timeout=cfg.reward_timeout)
    if cfg.eval_every and not eval_examples:
        raise ValueError(f"eval_every={cfg.eval_every} needs eval_examples")
    info = dist or DistInfo()
    if info.enabled and cfg.prompts_per_step % info.world_size:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must be divisible by the world size "
                         f"{info.world_size} (each rank takes whole groups)")
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if info.enabled:
        shard_model(policy)
        shard_model(reference)
    # One fused kernel instead of ~10 ops per parameter (a tiny model's step is per-op overhead);
    # FSDP2's sharded DTensor parameters keep the default implementation.
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, fused=not info.enabled)
    models = {"policy": policy, "reference": reference}
    sampler = PromptSampler(dataset, seed=cfg.seed)
    settings = json.loads(json.dumps({"grpo": dataclasses.asdict(cfg), **(run_info or {})}))
    start = 0
    log = ckpt = None
    if out_dir is not None:
        out = Path(out_dir)
        ckpt = CheckpointFolder(out / "checkpoints", keep=cfg.keep_checkpoints, dist=info)
        ckpt.clean_leftovers()
        latest = ckpt.latest()
        if latest is not None:
            saved = ckpt.load(latest, models, optimizer, settings=settings)
            start, sampler.position = saved["step"], saved["data_position"]
        if info.is_main:
            log = MetricsLog(out / "metrics.jsonl")
            log.truncate_after(start)

    G, B = cfg.group_size, cfg.prompts_per_step * cfg.group_size
    local = cfg.prompts_per_step // info.world_size          # prompts per rank
    lo, hi = info.rank * local, (info.rank + 1) * local
    history: list[dict[str, Any]] = []
    bar = Progress(cfg.steps, start, "grpo", enabled=show_progress and info.is_main)
    for step in range(start + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        examples = sampler.take(cfg.prompts_per_step)[lo:hi]
        seeds = [_rng(cfg.seed, step, f"row{i}") for i in range(lo * G, hi * G)]
        rollout = collect_rollout(policy, tokenizer, examples, group_size=G, max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seeds=seeds,
                                  record_routing=cfg.keep_routing, record_selection=cfg.keep_selection,
                                  record_prompt_selection=cfg.keep_prompt_selection,
                                  fp8_cache=cfg.sampler_fp8_cache,
                                  sync_ranks=info.enabled)
        B = rollout.size
        prompts = [ex.prompt for ex in rollout.examples]
        scores = scorer(prompts, rollout.completions, rollout.examples)
        adv, adv_metrics = group_advantages(scores.rewards.view(-1, G), scale_by_std=cfg.scale_by_std)
        rollout.advantages = adv.reshape(-1)
        t1 = time.perf_counter()

        ref_logp = None
        if cfg.kl_estimator != "none":
            ref_logp = _reference_logprobs(reference, rollout, cfg, rows_per_pass=-(-B // cfg.minibatches))
        record: dict[str, Any] = {
            "step": step,
            "reward_mean": float(scores.rewards.mean()),
            "reward_std": float(adv_metrics["reward_std"]),
            "accuracy": sum(map(is_correct, rollout.examples, rollout.completions)) / B,
            "zero_std_frac": float(adv_metrics["zero_std_frac"]),
            "reward_failures": scores.failures,
            **{f"reward_failures/{name}": n for name, n in scores.failures_by_function.items()},
            "response_length": float(rollout.lengths.float().mean()),
            "truncated_frac": rollout.finish_reason.count("length") / B,
        }
        if cfg.keep_selection or cfg.keep_prompt_selection:
            record["selection_bytes"] = rollout.selection_bytes
            record["selection_bytes_per_token"] = rollout.selection_bytes / max(1, rollout.completion_mask.numel())
        if info.enabled:
            rollout, ref_logp = _gather(rollout, ref_logp, info)
        record.update(grpo_update(policy, optimizer, rollout, ref_logp, cfg, step, info))
        record["rollout_seconds"] = t1 - t0
        record["update_seconds"] = time.perf_counter() - t1
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            record["eval_accuracy"] = greedy_accuracy(policy, tokenizer, eval_examples,
                                                      max_new_tokens=cfg.max_new_tokens, rank=info.rank,
                                                      world_size=info.world_size)
        if info.enabled:
            record = _average_over_ranks(record, info)
        history.append(record)
        if log is not None:
            log.write(record)
        if ckpt is not None and (step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
            ckpt.save(step, models, optimizer, {"step": step, "data_position": sampler.position}, settings=settings)
        bar.update(reward=record["reward_mean"], acc=record["accuracy"])
    bar.close()
    scorer.close()      # stops the reward worker (a time limit's); one left by an error exits with us
    return history
