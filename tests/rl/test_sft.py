"""SFT warm start: teacher-forcing tensors put the loss on the answer and EOS only, and training
fits a small set."""

from __future__ import annotations

import pytest
import torch

from dsv32.rl import SFTConfig, SupervisedFinetuning, encode_prompt, sft_batch, train_sft
from dsv32.training.optim import lr_factor
from dsv32.tasks import Example
from tests.rl.helpers import TOKENIZER, tiny_policy


def test_batch_targets_are_the_answer_and_eos_only():
    examples = [Example("Q: 1+1?\nA: ", "2"), Example("Q: 10+10?\nA: ", "20")]
    inputs, labels, mask = sft_batch(TOKENIZER, examples)
    graded_tokens = labels != -100
    longest = len(encode_prompt(TOKENIZER, examples[1].prompt)) + 2 + 1
    assert inputs.shape == mask.shape == labels.shape == (2, longest)
    assert torch.equal(labels[graded_tokens], inputs[graded_tokens])
    for row, ex in enumerate(examples):
        prompt = encode_prompt(TOKENIZER, ex.prompt)
        seq = prompt + TOKENIZER.encode(ex.answer) + [TOKENIZER.eos_id]
        n = len(seq)
        assert inputs[row, :n].tolist() == seq and mask[row, :n].all() and not mask[row, n:].any()
        assert (inputs[row, n:] == TOKENIZER.pad_id).all()
        graded = graded_tokens[row]
        assert inputs[row, graded].tolist() == TOKENIZER.encode(ex.answer) + [TOKENIZER.eos_id]
        assert graded.nonzero().min() == len(prompt)     # the first answer token, predicted from the prompt's last
    assert inputs[0, 0] == TOKENIZER.bos_id


def test_sft_fits_a_few_examples(tmp_path):
    model = tiny_policy()
    data = [Example("Question: What is 2 + 2?\nAnswer: ", "4"), Example("Question: What is 3 + 5?\nAnswer: ", "8")]
    loss = SupervisedFinetuning()
    with torch.no_grad():
        before = float(loss(model, sft_batch(TOKENIZER, data)).loss)
    history = train_sft(model, TOKENIZER, data, SFTConfig(steps=25, batch_size=2, lr=3e-3, warmup_steps=5),
                        out_dir=tmp_path, metrics_name="m.jsonl", show_progress=False)
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 25
    with torch.no_grad():
        after = float(loss(model, sft_batch(TOKENIZER, data)).loss)
    # The trainer's schedule (optim.lr_factor): the last of 25 steps is one step short of the lr/10 floor.
    last = 3e-3 * lr_factor(24, warmup=5, total=25, min_ratio=0.1)
    assert after < 0.1 * before and history[-1]["lr"] == pytest.approx(last) and last == pytest.approx(3e-4, rel=0.06)


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
    constant = SFTConfig(steps=100, lr=1.0, warmup_steps=10, schedule="constant").train_config()
    cosine = SFTConfig(steps=100, lr=1.0, warmup_steps=10).train_config()

    def lr_at(config, update):                  # the lr of update `update` (1-based), as the trainer sets it
        return config.lr * lr_factor(update - 1, warmup=config.warmup_steps, total=config.steps,
                                     min_ratio=config.min_lr_ratio)

    assert lr_at(constant, 5) == lr_at(cosine, 5) == 0.5 and lr_at(constant, 100) == 1.0
    assert lr_at(cosine, 11) == pytest.approx(1.0, abs=1e-3) and lr_at(cosine, 100) == pytest.approx(0.1, abs=1e-3)
    with pytest.raises(ValueError, match="schedule must be one of"):
        SFTConfig(schedule="linear")
