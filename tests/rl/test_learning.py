"""GRPO learns: the real loop, HF engine and DeepSpeed + PEFT learner on a tiny model.

The task: a word-level vocabulary of 16 words; the reward is 1 when the first sampled word
is ``yes`` or ``sure``. A freshly initialised model samples them about 1 time in 8, so the
reward starts well below 0.3; the test asserts it ends above 0.8, that the LoRA tensors
changed (and only they) and that the policy version advanced with every step.
"""

import json

import pytest
import torch

from actors.learner import Learner
from actors.rollout_hf import HFRolloutEngine
from rl.loop import LoopSettings, TrainItem, train
from rl.records import Prompt, SamplingParams
from verifiers.rewards import Example, RewardResult

from tests.tiny import build_word_model

REWARDED = {"yes", "sure"}
LORA = dict(lora_rank=8, lora_alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"))


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    return build_word_model(tmp_path_factory.mktemp("word-llama"))


def score(pairs):
    out = []
    for text, _ in pairs:
        first = text.split()[:1]
        out.append(RewardResult(float(first[0] in REWARDED) if first else 0.0, None, bool(first), False))
    return out


class Sink:
    def __init__(self):
        self.rows = []

    def log(self, step, metrics):
        self.rows.append(metrics)


@pytest.mark.slow
def test_grpo_raises_the_reward_on_a_tiny_model(word_model):
    path, tokenizer = word_model
    torch.set_num_threads(1)
    prompts = ["red blue", "one two", "cat dog", "sun moon", "up down", "no maybe"]
    items = [TrainItem(f"p{i}", Prompt(tokenizer(text)["input_ids"], text), Example(truth=0), "synthetic")
             for i, text in enumerate(prompts)]
    learner = Learner(str(path), **LORA, lr=1e-2, weight_decay=0.0, warmup_steps=0, total_steps=30,
                      lr_schedule="constant", max_grad_norm=1.0, tis_cap=2.0, seed=0)
    engine = HFRolloutEngine(str(path), **LORA, seed=0)
    engine.update_adapter(learner.policy_version, learner.export_adapter())
    before = {name: t.clone() for name, t in learner.export_adapter().items()}
    base_before = {n: p.detach().clone() for n, p in learner.module.named_parameters() if "lora_" not in n}

    settings = LoopSettings(steps=30, prompts_per_step=4, group_size=8,
                            sampling=SamplingParams(max_new_tokens=1, temperature=1.0), seed=0)
    sink = Sink()
    history = train(items, engine, learner, score, settings, sink)

    curve = [round(m["reward/mean"], 3) for m in history]
    print("reward curve:", json.dumps(curve))
    assert curve[0] < 0.3, curve  # step 0 samples from the initial policy
    assert sum(curve[-5:]) / 5 > 0.8, curve
    versions = [m["policy_version"] for m in history]
    assert versions == sorted(versions) and versions[-1] >= 20  # steps with no signal are skipped
    after = learner.export_adapter()
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert all(torch.equal(p.detach(), base_before[n])
               for n, p in learner.module.named_parameters() if "lora_" not in n)
    assert engine.policy_version == learner.policy_version
    assert all(torch.equal(engine.adapter_state()[name], after[name]) for name in after)
