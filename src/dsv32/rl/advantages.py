"""Group-relative advantages for GRPO (docs/math.md §10).

Shape legend: N prompts, G sampled outputs per prompt, B = N*G sequences.

    A_i = R_i - mean_{j in group(i)} R_j                      (the V3.2 paper: no std division)
    A_i = (R_i - mean_j R_j) / (std_j R_j + eps)              (optional, as in DeepSeekMath)

Left out on purpose: reward computation and shaping (length penalties, format rewards) —
they belong to the environment, not to the estimator; and leave-one-out baselines, which V3.2
does not use.
"""

from __future__ import annotations

import torch

Metrics = dict[str, torch.Tensor]


def group_advantages(rewards: torch.Tensor, *, scale_by_std: bool = False,
                     eps: float = 1e-6) -> tuple[torch.Tensor, Metrics]:
    """Advantages relative to each prompt's group of samples.

    rewards: (N, G), one row per prompt, G samples each.
    scale_by_std: divide by the group's population std (+ eps). Population rather than sample
        std, so that scaled advantages have unit mean square within every group whatever G is.
    eps: keeps groups whose rewards are all equal finite (their advantages are 0 either way).

    Returns advantages (N, G) (float32 unless rewards are float64) and metrics (detached 0-dim
    tensors): `zero_std_frac`, the fraction of groups whose rewards are all equal and which
    therefore carry no learning signal, and `reward_std`, the mean within-group reward std.
    """
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be (N_prompts, G), got shape {tuple(rewards.shape)}")
    G = rewards.shape[1]
    if G < 2:
        raise ValueError(f"group size G must be >= 2 (an advantage is a deviation from the group mean), got G={G}")
    std_n = rewards.std(dim=1, correction=0)                            # (N,)
    constant_n = rewards.amax(dim=1) == rewards.amin(dim=1)             # (N,)
    adv = rewards - rewards.mean(dim=1, keepdim=True)                   # (N, G)
    if scale_by_std:
        adv = adv / (std_n[:, None] + eps)
    # Compared exactly (max == min) rather than std == 0: the float mean of equal rewards can be
    # off by an ulp, leaving a tiny non-zero std.
    metrics = {"zero_std_frac": constant_n.float().mean(), "reward_std": std_n.mean()}
    return adv, metrics
