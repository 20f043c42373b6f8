"""Shared pieces of the GRPO-loop tests: a seeded `tiny`-preset model whose attention is dense
(index_topk above every test length, so decode and the training forward select the same keys)
and a few arithmetic prompts."""

from __future__ import annotations

import torch

from dsv32 import DSV32ForCausalLM
from dsv32.rl import task_examples
from dsv32.tokenizer import ByteTokenizer
from tests.conftest import tiny_model

TOKENIZER = ByteTokenizer()


def tiny_policy(seed: int = 0, std: float = 0.1) -> DSV32ForCausalLM:
    """The "policy" test model (tests/conftest.py), in eval mode."""
    return tiny_model("policy", seed=seed, std=std).eval()


def arithmetic(n: int, seed: int = 0):
    return task_examples("arithmetic", n, seed=seed, options={"digits": 1})


def digit_reward(prompt: str, completion: str, example) -> float:
    """A dense reward a random model can climb: the fraction of digits among the first 4 characters."""
    return sum(ch.isdigit() for ch in completion[:4]) / 4


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
