"""`dsv32 demo`: the main job on the embedded default.

Builds the `tiny` preset, writes it in the Hugging Face layout and reads it back (checking every
tensor survived), runs a forward pass on a byte-encoded sentence, and prints which earlier
tokens the lightning indexer selected for the last positions, next to the dense attention it
replaces.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ModelConfig
from .model import AttentionOptions, DSV32ForCausalLM

SENTENCE = "DeepSeek Sparse Attention picks the top-k past tokens for each query."


def _encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def run_demo(out_dir: str | Path = "runs/demo", seed: int = 0) -> Path:
    from .checkpoint import load_pretrained
    out = Path(out_dir)
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("tiny")
    model = DSV32ForCausalLM(cfg).eval()
    model.init_weights(seed=seed)
    print(f"[1/3] built preset 'tiny': {model.num_parameters():,} parameters, {cfg.num_hidden_layers} layers "
          f"({cfg.num_moe_layers} MoE, {cfg.n_routed_experts} experts, top-{cfg.num_experts_per_tok}), "
          f"index top-k {cfg.index_topk}")
    ckpt = out / "tiny-hf"
    model.save_pretrained(ckpt)
    loaded = load_pretrained(ckpt).eval()
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    files = sorted(p.name for p in ckpt.iterdir())
    print(f"[2/3] saved in the Hugging Face layout at {ckpt} ({', '.join(files)}) and loaded back: "
          f"{'identical' if same else 'DIFFERENT'} weights")
    if not same:
        raise RuntimeError("the checkpoint round trip changed the weights")

    ids = torch.tensor([_encode(SENTENCE)])
    with torch.no_grad():
        sparse = loaded(ids, return_indices=True)
        dense = loaded(ids, attention=AttentionOptions(sparse=False))
    T = ids.shape[1]
    diff = (sparse.logits - dense.logits).abs().max().item()
    print(f"[3/3] forward pass on {T} byte tokens: logits {tuple(sparse.logits.shape)}; "
          f"sparse (k={cfg.index_topk}) vs dense max |diff| {diff:.2e} (untrained weights)")
    last = cfg.num_hidden_layers - 1
    text = SENTENCE
    for t in (T - 1, T // 2):
        chosen = sorted(int(s) for s in sparse.indices[last][0, t] if s >= 0)
        shown = "".join(text[s] if s in chosen else "·" for s in range(t + 1))
        print(f"   layer {last}, query {t:3d} ({text[t]!r}) attends {len(chosen)}/{t + 1} tokens: {shown}")
    return out
