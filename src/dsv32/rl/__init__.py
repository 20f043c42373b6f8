"""GRPO with the DeepSeek-V3.2 stabilisers (SPEC §5): pure functions the trainer composes.

    advantages  group_advantages
    logprobs    token_logprobs, token_entropy, kept_ids_to_mask  (keep sampling mask)
    losses      clipped_surrogate, kl_penalty, off_policy_mask, aggregate, grpo_loss
"""

from .advantages import group_advantages
from .logprobs import kept_ids_to_mask, token_entropy, token_logprobs
from .losses import aggregate, clipped_surrogate, grpo_loss, kl_penalty, off_policy_mask

__all__ = [
    "aggregate", "clipped_surrogate", "group_advantages", "grpo_loss", "kept_ids_to_mask",
    "kl_penalty", "off_policy_mask", "token_entropy", "token_logprobs",
]
