"""Why a small model's MQAR accuracy stalls: one plain AdamW loop (warm-up + cosine or constant
lr, answer-only `lm_loss`) for a dsv32 model (`recall_study.StudySizes.model_config`, dense
attention) or transformers' LlamaForCausalLM of the same size, on the same MQAR batches,
printing held-out answer accuracy and accuracy by query rank (the i-th answered query of a
sequence) every --every steps.

    python benchmarks/mqar_diagnosis.py --steps 600                     # answers in the ids (old construction)
    python benchmarks/mqar_diagnosis.py --steps 600 --zoo 1             # answer inputs hidden (Zoology's)
    python benchmarks/mqar_diagnosis.py --steps 600 --model llama --zoo 1

With the answers in the ids, accuracy rising with the query rank (about 1/(N - rank)) is the
signature of guessing among the values not yet answered, not of key-value recall.
"""
import argparse, time, math, os, sys, json
import torch
from dsv32.training.recall_study import StudySizes
from dsv32.tasks.mqar import MQAR, MQARSequences, answer_accuracy
from dsv32.training.losses import lm_loss
from dsv32.model import DSV32ForCausalLM, AttentionOptions
p = argparse.ArgumentParser(description="MQAR learning-speed diagnosis")
p.add_argument("--threads", type=int, default=1)
p.add_argument("--model", default="dsv32")
p.add_argument("--T", type=int, default=128); p.add_argument("--N", type=int, default=8); p.add_argument("--V", type=int, default=64)
p.add_argument("--hidden", type=int, default=128); p.add_argument("--layers", type=int, default=2)
p.add_argument("--bs", type=int, default=32); p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--steps", type=int, default=400); p.add_argument("--warmup", type=int, default=30)
p.add_argument("--wd", type=float, default=0.0); p.add_argument("--clip", type=float, default=1.0)
p.add_argument("--b2", type=float, default=0.95); p.add_argument("--sched", default="cos")
p.add_argument("--every", type=int, default=50); p.add_argument("--std", type=float, default=0.02)
p.add_argument("--power_a", type=float, default=0.01); p.add_argument("--fill", type=int, default=1)
p.add_argument("--tag", default=""); p.add_argument("--heads", type=int, default=4); p.add_argument("--zoo", type=int, default=0)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
task = MQAR(vocab_size=a.V, num_pairs=a.N, seq_len=a.T, power_a=a.power_a, random_fill=bool(a.fill),
            show_answers=True)          # --zoo 1 then sets each answer's input to 0
ev = task.batch(torch.Generator().manual_seed(10_000), 32)
def zoo(b):
    ids, labels = b
    if a.zoo: ids = ids.masked_fill(labels != -100, 0)
    return ids, labels
ev = zoo(ev)
s = StudySizes(seq_len=a.T, num_pairs=a.N, vocab_size=a.V, hidden=a.hidden, layers=a.layers, heads=a.heads)
if a.model == "dsv32":
    cfg = s.model_config(); cfg.initializer_range = a.std
    model = DSV32ForCausalLM(cfg, init=False); model.init_weights(seed=0)
    fwd = lambda x: model(x, attention=AttentionOptions(sparse=False)).logits
    params = [p_ for n, p_ in model.named_parameters() if ".indexer." not in n]
else:
    from transformers import LlamaConfig, LlamaForCausalLM
    lc = LlamaConfig(vocab_size=a.V, hidden_size=a.hidden, intermediate_size=2 * a.hidden, num_hidden_layers=a.layers,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4 * a.T, initializer_range=a.std)
    model = LlamaForCausalLM(lc)
    fwd = lambda x: model(x).logits
    params = list(model.parameters())
opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, a.b2), weight_decay=a.wd)
data = MQARSequences(task, seed=0)
def lr_at(step):
    if step < a.warmup: return (step + 1) / a.warmup
    if a.sched == "const": return 1.0
    pr = (step - a.warmup) / max(1, a.steps - a.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * pr))
t0 = time.time(); curve = []
for step in range(a.steps):
    for g in opt.param_groups: g["lr"] = a.lr * lr_at(step)
    ids, labels = zoo(data.next_batch(a.bs))
    model.train()
    loss, _ = lm_loss(fwd(ids), labels)
    opt.zero_grad(); loss.backward()
    if a.clip: torch.nn.utils.clip_grad_norm_(params, a.clip)
    opt.step()
    if (step + 1) % a.every == 0:
        model.eval()
        with torch.no_grad(): r = answer_accuracy(fwd(ev[0]), ev[1])
        curve.append((step + 1, round(r["accuracy"], 3)))
        with torch.no_grad():
            lg = fwd(ev[0]); tgt = ev[1][:, 1:]; c = tgt != -100
            right = (lg[:, :-1].argmax(-1) == tgt) & c
            rank = c.long().cumsum(1) - 1
            per = [round(float(right[c & (rank == i)].float().mean()), 2) for i in range(a.N)]
        print("  per-query-rank accuracy", per, flush=True)
        print(f"{a.tag} step {step+1} loss {loss.item():.3f} acc {r['accuracy']:.3f} t {time.time()-t0:.0f}s", flush=True)
print("RESULT", a.tag, json.dumps(vars(a)), curve, f"{time.time()-t0:.0f}s", flush=True)
