"""GRPO with the DeepSeek-V3.2 stabilisers (docs/math.md §10): pure loss pieces, and the loop that
composes them.

    advantages  group_advantages
    logprobs    token_logprobs, token_entropy, kept_ids_to_mask  (keep sampling mask)
    losses      clipped_surrogate, kl_penalty, off_policy_mask, aggregate, grpo_loss
    rollout     collect_rollout, Rollout, greedy_accuracy        (sampling with records)
    replay      policy_logprobs       (the training forward: keep routing, keep sampling mask)
    rewards     RewardScorer, task_reward, load_reward, is_correct, RewardError, RewardWarning
    datasets    task_examples, train_eval_split, load_examples, PromptSampler, encode_prompt
    grpo        GRPOConfig, train_grpo, grpo_update
    sft         SFTConfig, train_sft, sft_batch, SupervisedFinetuning   (warm start, an objective of
                the shared trainer)
    read_metrics  (from dsv32.training.metrics; checkpoints: dsv32.training.checkpointing)
    plot        plot_curves
    commands    the `dsv32 sft` / `dsv32 grpo` verbs
"""

from .advantages import group_advantages
from .datasets import PromptSampler, encode_prompt, load_examples, task_examples, train_eval_split
from .grpo import GRPOConfig, grpo_update, train_grpo
from .logprobs import kept_ids_to_mask, token_entropy, token_logprobs
from .losses import aggregate, clipped_surrogate, grpo_loss, kl_penalty, off_policy_mask
from .plot import plot_curves
from .replay import policy_logprobs
from .rewards import RewardError, RewardScorer, RewardWarning, is_correct, load_reward, task_reward
from .rollout import Rollout, collect_rollout, greedy_accuracy
from .sft import SFTConfig, SupervisedFinetuning, sft_batch, train_sft
from ..training.metrics import read_metrics

__all__ = [
    "GRPOConfig", "PromptSampler", "RewardError", "RewardScorer", "RewardWarning", "Rollout",
    "SFTConfig", "SupervisedFinetuning", "aggregate", "clipped_surrogate", "collect_rollout", "encode_prompt", "greedy_accuracy",
    "group_advantages", "grpo_loss", "grpo_update", "is_correct", "kept_ids_to_mask", "kl_penalty",
    "load_examples", "load_reward", "off_policy_mask", "plot_curves", "policy_logprobs",
    "read_metrics", "sft_batch", "task_examples", "task_reward", "token_entropy",
    "token_logprobs", "train_eval_split", "train_grpo", "train_sft",
]
