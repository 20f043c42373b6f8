"""One DSA step of each stage on a random model of Qwen2.5-0.5B's shape (CPU, float32): time and peak RSS.

    python benchmarks/retrofit_step_cost.py 512       # sequence length (batch 1, k = T/8)

What a user converting a real 0.5B checkpoint should expect per step; the optimizer is left out
(AdamW adds 8 bytes per trained parameter: the indexers in the warm-up, everything after)."""
import resource
import sys
import time

import torch

from dsv32.model.gqa import GQAForCausalLM
from dsv32.model.gqa_config import DenseConfig, IndexerSpec
from dsv32.training.dsa import IndexerWarmup, SparseTraining
torch.set_num_threads(1)
T = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
cfg = DenseConfig(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, head_dim=64, max_position_embeddings=32768,
                  tie_word_embeddings=True, rope_theta=1000000.0)
cfg = cfg.with_indexer(IndexerSpec.for_model(cfg, topk=T // 8))
model = GQAForCausalLM(cfg)
n = sum(p.numel() for p in model.parameters()); ni = sum(p.numel() for k, p in model.named_parameters() if ".indexer." in k)
print(f"params {n/1e6:.1f} M, indexer {ni/1e6:.2f} M, spec {cfg.indexer}")
ids = torch.randint(0, 151936, (1, T))
for name, obj in (("warm-up", IndexerWarmup()), ("sparse", SparseTraining())):
    for p in model.parameters():
        p.requires_grad_(obj.trainable(next(k for k, q in model.named_parameters() if q is p)))
    ts = []
    for _ in range(1):
        t = time.perf_counter(); obj(model, ids).loss.backward(); ts.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
    print(f"{name}: step (forward + backward, no optimizer) {ts[-1]:.1f} s; peak RSS so far "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB", flush=True)
