"""Print the largest logit difference between dsv32 and transformers' DeepseekV32ForCausalLM on the
three tiny parity configs of the test suite, in both directions and with a left-padded batch
(the tests assert 1e-4; this shows the margin).

    python scripts/parity_report.py
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402

import dsv32  # noqa: E402
from tests.conftest import PARITY_CONFIGS, randomize_, tiny_config  # noqa: E402
from tests.model.test_parity_hf import hf_model, inputs  # noqa: E402


def main() -> None:
    for name in sorted(PARITY_CONFIGS):
        cfg = tiny_config(**PARITY_CONFIGS[name])
        torch.manual_seed(0)
        hf = randomize_(hf_model(cfg), seed=3)
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            ours = dsv32.load_pretrained(d).eval()
        ids, mask = inputs(cfg)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            ref, mine = hf(ids).logits, ours(ids).logits
            ref_pad = hf(ids, attention_mask=mask, position_ids=pos).logits
            mine_pad = ours(ids, attention_mask=mask).logits
        with tempfile.TemporaryDirectory() as d:
            ours.save_pretrained(d)
            back = transformers.DeepseekV32ForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
        with torch.no_grad():
            rev = back(ids).logits
        keep = mask.bool()
        print(f"{name:12s} hf->dsv32 {(ref - mine).abs().max().item():.1e}   "
              f"left-padded {(ref_pad - mine_pad)[keep].abs().max().item():.1e}   "
              f"dsv32->hf {(rev - mine).abs().max().item():.1e}   (max |logit| {ref.abs().max().item():.1f})")


if __name__ == "__main__":
    main()
