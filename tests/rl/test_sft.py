"""SFT warm start: teacher-forcing tensors put the loss on the answer and EOS only, and training
fits a small set."""

from __future__ import annotations

import pytest
import torch

from dsv32.rl import SFTConfig, encode_prompt, sft_batch, train_sft
from dsv32.rl.sft import IGNORE, sft_loss
from dsv32.training.tasks import Example
from tests.rl.helpers import TOKENIZER, tiny_policy


def test_batch_targets_are_the_answer_and_eos_only():
    examples = [Example("Q: 1+1?\nA: ", "2"), Example("Q: 10+10?\nA: ", "20")]
    inputs, mask, targets = sft_batch(TOKENIZER, examples)
    longest = len(encode_prompt(TOKENIZER, examples[1].prompt)) + 2 + 1
    assert inputs.shape == mask.shape == targets.shape == (2, longest - 1)
    for row, ex in enumerate(examples):
        prompt = encode_prompt(TOKENIZER, ex.prompt)
        seq = prompt + TOKENIZER.encode(ex.answer) + [TOKENIZER.eos_id]
        n = len(seq) - 1
        assert inputs[row, :n].tolist() == seq[:-1] and mask[row, :n].all() and not mask[row, n:].any()
        assert (inputs[row, n:] == TOKENIZER.pad_id).all()
        graded = targets[row] != IGNORE
        assert targets[row, graded].tolist() == TOKENIZER.encode(ex.answer) + [TOKENIZER.eos_id]
        assert graded.nonzero().min() == len(prompt) - 1           # predicted from the prompt's last token
    assert inputs[0, 0] == TOKENIZER.bos_id


def test_sft_fits_a_few_examples(tmp_path):
    model = tiny_policy()
    data = [Example("Question: What is 2 + 2?\nAnswer: ", "4"), Example("Question: What is 3 + 5?\nAnswer: ", "8")]
    with torch.no_grad():
        before = float(sft_loss(model, *sft_batch(TOKENIZER, data)))
    history = train_sft(model, TOKENIZER, data, SFTConfig(steps=25, batch_size=2, lr=3e-3, warmup_steps=5),
                        metrics_path=tmp_path / "m.jsonl", show_progress=False)
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 25
    with torch.no_grad():
        after = float(sft_loss(model, *sft_batch(TOKENIZER, data)))
    assert after < 0.1 * before and history[-1]["lr"] == pytest.approx(3e-4)


@pytest.mark.parametrize("changes,field", [(dict(steps=0), "steps"), (dict(lr=0.0), "lr"),
                                           (dict(batch_size=1.5), "batch_size"), (dict(weight_decay=-1.0), "weight_decay")])
def test_config_rejects_bad_values(changes, field):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SFTConfig(**changes)


def test_stop_hook_and_schedules():
    data = [Example("Question: What is 2 + 2?\nAnswer: ", "4")]
    history = train_sft(tiny_policy(), TOKENIZER, data, SFTConfig(steps=50, batch_size=1, schedule="constant"),
                        show_progress=False, stop=lambda record: record["step"] == 3)
    assert [r["step"] for r in history] == [1, 2, 3]
    constant = SFTConfig(steps=100, lr=1.0, warmup_steps=10, schedule="constant")
    cosine = SFTConfig(steps=100, lr=1.0, warmup_steps=10)
    assert constant.lr_at(5) == cosine.lr_at(5) == 0.5 and constant.lr_at(100) == 1.0
    assert cosine.lr_at(11) == pytest.approx(1.0, abs=1e-3) and cosine.lr_at(100) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule must be one of"):
        SFTConfig(schedule="linear")
