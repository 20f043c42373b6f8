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


def hf_dense_checkpoint(path: Path, family: str, **overrides) -> Path:
    """A tiny random dense checkpoint written by transformers' own `{family}ForCausalLM` ("Llama",
    "Qwen3", ...): byte-sized vocabulary, 2 layers, 4 query / 2 kv heads of 8 dims."""
    import torch
    import transformers

    from tests.conftest import randomize_
    settings = dict(vocab_size=260, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, max_position_embeddings=512)
    cfg = getattr(transformers, f"{family}Config")(**{**settings, **overrides})
    torch.manual_seed(0)
    randomize_(getattr(transformers, f"{family}ForCausalLM")(cfg), seed=1, std=0.1).save_pretrained(path)
    return path
