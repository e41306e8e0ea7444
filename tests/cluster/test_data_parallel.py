"""Data-parallel learner ranks on a real local Ray cluster (CPU, DeepSpeed over gloo), with a
tiny random Llama: two ranks take the same steps one rank takes."""

import pytest
import ray
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cluster.groups import LearnerGroup
from cluster.hosts import LearnerHost
from rl.records import TrainGroup

LEARNER = dict(lora_rank=4, lora_alpha=8, lr=1e-2, weight_decay=0.0, warmup_steps=0, total_steps=100,
               lr_schedule="constant", max_grad_norm=1.0, tis_cap=None, seed=0)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    try:
        yield str(path)
    finally:
        ray.shutdown()


def group(start, completions, advantages):
    return TrainGroup(prompt_ids=list(range(start, start + 6)), completions=[list(c) for c in completions],
                      advantages=list(advantages), rollout_logprobs=[[-1.0] * len(c) for c in completions],
                      truncated=[False] * len(completions), policy_version=0)


def batches():
    return [[group(5, [[20, 21, 22], [23], [24, 25, 26, 27, 28]], [1.0, -1.0, 0.5]),
             group(40, [[50], [51, 52, 53]], [0.7, -0.7]),
             group(60, [[61, 62], [63, 64], [65]], [-0.3, 0.9, -0.6])],
            [group(70, [[71, 72, 73, 74]], [1.0])]]  # one group: a rank gets none


def learners(path, ranks: int) -> LearnerGroup:
    host = ray.remote(LearnerHost)
    return LearnerGroup([host.options(num_cpus=0.5).remote(dict(model_path=path, **LEARNER), 1.0, rank, ranks)
                         for rank in range(ranks)])


@pytest.mark.slow
def test_two_ranks_take_the_step_one_rank_takes(tiny_model, tmp_path):
    one, two = learners(tiny_model, 1), learners(tiny_model, 2)
    for batch in batches():
        a, b = one.train_step(batch), two.train_step(batch)
        assert b.tokens == a.tokens and b.loss == pytest.approx(a.loss, rel=1e-5, abs=1e-7)
        assert not a.skipped and not b.skipped
    assert one.policy_version == two.policy_version == 2
    expected, got = one.export_adapter(), two.export_adapter()
    assert any(t.abs().sum() > 0 for name, t in expected.items() if "lora_B" in name)  # it did learn
    for name in expected:  # float sums in another order; Adam magnifies them where a gradient is ~0
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=2e-5)
    ranks = ray.get([actor.export_adapter.remote() for actor in two.actors])
    assert all(torch.equal(ranks[0][1][n], ranks[1][1][n]) for n in expected)  # ranks stay equal
    two.save_state(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("learner_state*")) == ["learner_state.rank0.pt",
                                                                      "learner_state.rank1.pt"]
