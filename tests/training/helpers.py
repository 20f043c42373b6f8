"""Small corpora and trainers for the training tests (CPU, seconds)."""

from __future__ import annotations

import random
from pathlib import Path

from dsv32 import DSV32ForCausalLM
from dsv32.tokenizer import ByteTokenizer
from dsv32.training.data import Document, PackedSequences
from dsv32.training.objectives import LanguageModeling
from dsv32.training.trainer import Trainer, TrainConfig
from tests.conftest import tiny_model

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega").split()


def documents(n: int = 30, words: int = 120, seed: int = 0) -> list[Document]:
    rng = random.Random(seed)
    return [Document(f"doc{i}", " ".join(rng.choice(WORDS) for _ in range(words)) + "\n") for i in range(n)]


def write_corpus(folder: Path, n: int = 40, words: int = 150) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for doc in documents(n, words):
        (folder / f"{doc.source}.txt").write_text(doc.text)
    return folder


def byte_model(seed: int = 0, **overrides) -> DSV32ForCausalLM:
    """The "byte" test model (tests/conftest.py)."""
    return tiny_model("byte", seed=seed, **overrides)


def make_trainer(out: Path, *, model_seed: int = 0, checkpointer=None, objective=None, **config) -> Trainer:
    settings = dict(steps=6, batch_size=2, grad_accum=2, lr=3e-3, warmup_steps=2, log_every=1, progress=False,
                    bias_update_gamma=1e-2)
    settings.update(config)
    data = PackedSequences(documents(), ByteTokenizer(), seq_len=48, seed=0)
    return Trainer(byte_model(model_seed), objective or LanguageModeling(balance_alpha=1e-3), data,
                   TrainConfig(**settings), out, checkpointer=checkpointer)
