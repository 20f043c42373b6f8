"""The GRPO loop: config checks, metrics, learning on a dense reward, off-policy updates, and a
resumed run repeating an uninterrupted one exactly, and resume refusing other settings or another
model shape."""

from __future__ import annotations

import shutil

import pytest

from dsv32 import DSV32ForCausalLM, ModelConfig
from dsv32.rl import GRPOConfig, plot_curves, read_metrics, train_grpo
from dsv32.rl.plot import _trailing_mean
from tests.rl.helpers import TOKENIZER, arithmetic, digit_reward, same_weights, tiny_policy

SMALL = dict(prompts_per_step=2, group_size=4, max_new_tokens=4, top_p=0.9, lr=3e-3)


@pytest.mark.parametrize("changes,field", [
    (dict(group_size=1), "group_size"), (dict(delta=0.0), "delta"), (dict(delta=-1.0), "delta"),
    (dict(eps_low=1.0), "eps_low"), (dict(eps_high=0.0), "eps_high"), (dict(kl_estimator="k2"), "kl_estimator"),
    (dict(aggregation="sum"), "aggregation"), (dict(temperature=0.0), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(minibatches=9, prompts_per_step=2, group_size=4), "minibatches"), (dict(steps=0), "steps"),
    (dict(beta=-0.1), "beta"), (dict(keep_routing="yes"), "keep_routing"), (dict(group_size=2.0), "group_size"),
])
def test_config_rejects_bad_values_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        GRPOConfig(**changes)


def test_metrics_and_first_update_ratio(tmp_path):
    config = GRPOConfig(steps=2, ppo_epochs=2, minibatches=2, eval_every=2, **SMALL)
    history = train_grpo(tiny_policy(), TOKENIZER, arithmetic(8), config, reward_fns=digit_reward,
                         out_dir=tmp_path, eval_examples=arithmetic(3, seed=1), show_progress=False)
    assert [r["step"] for r in history] == [1, 2] and read_metrics(tmp_path / "metrics.jsonl") == history
    for key in ("reward_mean", "accuracy", "kl", "clip_frac", "masked_frac", "ratio_mean", "ratio_max",
                "entropy", "response_length", "reward_failures", "mismatch", "grad_norm"):
        assert key in history[0], key
    assert "eval_accuracy" in history[1] and "eval_accuracy" not in history[0]
    # Weights equal the sampler's at each step's first update: the kept set makes the ratio 1.
    assert all(r["mismatch"] < 1e-5 for r in history)
    # Four updates per rollout at a high rate: the later ones are off-policy.
    assert history[-1]["ratio_max"] > 1.01 and history[-1]["kl"] > 0
    assert plot_curves({"run": history}, tmp_path / "c.png", smooth=2).stat().st_size > 1000


def test_trailing_mean_and_plot_arguments(tmp_path):
    assert _trailing_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    with pytest.raises(ValueError, match="smooth"):
        plot_curves({"run": [{"step": 1, "kl": 0.1}]}, tmp_path / "x.png", smooth=0)
    with pytest.raises(ValueError, match="none of the metrics"):
        plot_curves({"run": [{"step": 1}]}, tmp_path / "x.png")


def test_grpo_climbs_a_dense_reward():
    config = GRPOConfig(steps=12, prompts_per_step=4, group_size=8, max_new_tokens=4, lr=1e-2, beta=0.0,
                        delta=None)
    history = train_grpo(tiny_policy(), TOKENIZER, arithmetic(8), config, reward_fns=digit_reward,
                         show_progress=False)
    first = sum(r["reward_mean"] for r in history[:3]) / 3
    last = sum(r["reward_mean"] for r in history[-3:]) / 3
    assert last > first + 0.1, (first, last)


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    config = dict(ppo_epochs=2, minibatches=2, checkpoint_every=2, keep_checkpoints=2, **SMALL)
    data = arithmetic(5)                       # 5 prompts, 2 per step: steps cross epoch boundaries
    straight = tiny_policy()
    train_grpo(straight, TOKENIZER, data, GRPOConfig(steps=4, **config), reward_fns=digit_reward,
               out_dir=tmp_path / "whole", show_progress=False)

    parts = tmp_path / "parts"
    train_grpo(tiny_policy(), TOKENIZER, data, GRPOConfig(steps=3, **config), reward_fns=digit_reward,
               out_dir=parts, show_progress=False)
    # As if the process died after writing step 3's metrics but before its checkpoint.
    shutil.rmtree(parts / "checkpoints" / "checkpoint-00000003")
    resumed = tiny_policy(seed=99)             # resuming overwrites every weight
    history = train_grpo(resumed, TOKENIZER, data, GRPOConfig(steps=4, **config), reward_fns=digit_reward,
                         out_dir=parts, show_progress=False)
    assert [r["step"] for r in history] == [3, 4]

    def strip(records):
        return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in records]

    assert strip(read_metrics(parts / "metrics.jsonl")) == strip(read_metrics(tmp_path / "whole" / "metrics.jsonl"))
    assert same_weights(resumed, straight)


def test_resume_checks_settings_and_model_shape_and_more_steps_extend(tmp_path):
    config = dict(checkpoint_every=1, **SMALL)
    data = arithmetic(4)
    train_grpo(tiny_policy(), TOKENIZER, data, GRPOConfig(steps=1, **config), reward_fns=digit_reward,
               out_dir=tmp_path, show_progress=False, run_info={"task": "arithmetic"})
    changed = GRPOConfig(steps=2, **{**config, "group_size": 2, "lr": 1e-3})
    with pytest.raises(ValueError, match=r"other settings \(grpo.group_size: 4 vs 2; grpo.lr: 0.003 vs 0.001; "
                                         r"task: 'arithmetic' vs 'chess'; checkpoint vs now\)"):
        train_grpo(tiny_policy(), TOKENIZER, data, changed, reward_fns=digit_reward, out_dir=tmp_path,
                   show_progress=False, run_info={"task": "chess"})
    deeper = DSV32ForCausalLM(ModelConfig.preset("tiny", index_topk=128, max_position_embeddings=256,
                                                 num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"another model config of 'policy' \(.*num_hidden_layers: 2 vs 3") as e:
        train_grpo(deeper, TOKENIZER, data, GRPOConfig(steps=2, **config), reward_fns=digit_reward,
                   out_dir=tmp_path, show_progress=False, run_info={"task": "arithmetic"})
    assert "\n" not in str(e.value) and "size mismatch" not in str(e.value)
    # More steps (and another checkpoint cadence) continue the finished run.
    history = train_grpo(tiny_policy(seed=5), TOKENIZER, data, GRPOConfig(steps=2, **{**config, "checkpoint_every": 0}),
                         reward_fns=digit_reward, out_dir=tmp_path, show_progress=False,
                         run_info={"task": "arithmetic"})
    assert [r["step"] for r in history] == [2] and [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
