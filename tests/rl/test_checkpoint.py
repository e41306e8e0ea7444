"""rl/checkpoint.py: atomic step folders, pruning after the new one is complete, resume
resolution, RNG capture, the graceful stop -- and an exact resume of the real loop (HF engine +
DeepSpeed learner on a tiny word-level model): 4 steps in one go equal 2 steps, a checkpoint, a
fresh learner and engine, and 2 more steps (same prompts, same metrics, same LoRA tensors)."""

from __future__ import annotations

import doctest
import hashlib
import json
import os
import random
import signal
import time

import numpy as np
import pytest

from rl.checkpoint import (CheckpointError, CheckpointManager, GracefulStop, TrainingStopped,
                           capture_rng, is_due, read_meta, restore_rng, sha256_file)


def writer(payload="x"):
    def write(folder):
        (folder / "adapter").mkdir()
        (folder / "adapter" / "weights.bin").write_text(payload)
    return write


def steps(manager):
    return [step for step, _ in manager.complete()]


# --------------------------------------------------------------------------------------------
# Saving, pruning, finding


def test_save_writes_a_complete_step_folder(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=3)
    path = manager.save(2, writer("a"), {"data_position": 9, "policy_version": 2})
    assert path == tmp_path / "ckpt" / "step_000002" and manager.latest() == path
    assert (path / "adapter" / "weights.bin").read_text() == "a"
    meta = read_meta(path)
    assert (meta["step"], meta["data_position"], meta["policy_version"]) == (2, 9, 2)
    assert "python" in meta["rng"] and abs(meta["time"] - time.time()) < 60
    assert json.loads((path / "meta.json").read_text()) == meta
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step_000002"]  # no temp left
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_000002"


def test_a_failed_write_leaves_no_step_and_the_next_save_cleans_up(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    first = manager.save(1, writer(), {})

    def crash(folder):
        writer()(folder)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        manager.save(2, crash, {})
    assert manager.latest() == first and steps(manager) == [1]  # keep_last=1 pruned nothing
    assert any(p.name.startswith(".tmp-step_000002") for p in tmp_path.iterdir())
    manager.save(3, writer(), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000003"]


def test_keep_last_prunes_only_once_the_new_one_is_complete(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(1, writer(), {})
    manager.save(2, writer(), {})

    def check_old_ones_still_there(folder):
        assert steps(manager) == [1, 2]
        writer()(folder)

    manager.save(3, check_old_ones_still_there, {})
    assert steps(manager) == [2, 3]
    keep_all = CheckpointManager(tmp_path, keep_last=0)
    keep_all.save(4, writer(), {})
    keep_all.save(5, writer(), {})
    assert steps(keep_all) == [2, 3, 4, 5]


def test_prune_never_removes_the_checkpoint_just_saved(tmp_path):
    """Resumed from step 2 while step 5 exists: saving step 3 keeps step 3."""
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(5, writer(), {})
    manager.save(3, writer(), {})
    assert steps(manager) == [3, 5]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(4, writer("old"), {})
    path = manager.save(4, writer("new"), {"note": "again"})
    assert (path / "adapter" / "weights.bin").read_text() == "new" and steps(manager) == [4]
    assert read_meta(path)["note"] == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000004"]


def test_latest_ignores_temporary_incomplete_and_foreign_folders(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=0)
    assert manager.latest() is None and CheckpointManager(tmp_path / "none", 1).latest() is None
    manager.save(3, writer(), {})
    (tmp_path / ".tmp-step_000009-abcd").mkdir()
    (tmp_path / "step_000007").mkdir()  # no meta.json
    (tmp_path / "step_8").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    assert manager.latest() == tmp_path / "step_000003"


def test_resolve(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=0)
    assert manager.resolve(False) is None and manager.resolve(None) is None
    assert manager.resolve(True) is None  # nothing saved yet: a first start
    manager.save(1, writer(), {})
    second = manager.save(2, writer(), {})
    assert manager.resolve(True) == manager.resolve("auto") == second
    first = tmp_path / "ckpt" / "step_000001"
    assert manager.resolve(str(first)) == first
    assert manager.resolve("step_000001") == first  # a folder name under root
    monkeypatch.chdir(tmp_path)
    assert manager.resolve("ckpt/step_000001") == first.relative_to(tmp_path)
    with pytest.raises(CheckpointError, match="no such folder.*latest under .*step_000002"):
        manager.resolve("step_000042")
    (tmp_path / "ckpt" / "step_000003").mkdir()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        manager.resolve("step_000003")
    with pytest.raises(CheckpointError, match="no meta.json"):
        read_meta(tmp_path / "ckpt" / "step_000003")


def test_doctests():
    import rl.checkpoint

    assert doctest.testmod(rl.checkpoint).failed == 0


def test_is_due_and_bad_arguments(tmp_path):
    assert [s for s in range(7) if is_due(s, 3, 7)] == [2, 5, 6]
    assert [s for s in range(4) if is_due(s, 0, 4)] == [3]
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=-1)
    with pytest.raises(ValueError, match="step"):
        CheckpointManager(tmp_path, 1).save(-1, writer(), {})


def test_sha256_file(tmp_path):
    (tmp_path / "config.yaml").write_text("a: 1\n")
    assert sha256_file(tmp_path / "config.yaml") == hashlib.sha256(b"a: 1\n").hexdigest()


def test_rng_states_round_trip_through_json():
    random.seed(3)
    np.random.seed(4)
    state = json.loads(json.dumps(capture_rng()))
    expected = (random.random(), np.random.rand())
    random.seed(99)
    np.random.seed(99)
    restore_rng(state)
    assert (random.random(), np.random.rand()) == expected


# --------------------------------------------------------------------------------------------
# Graceful stop


def wait_for(predicate, seconds=2.0):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_graceful_stop_sets_a_flag_on_sigterm_and_restores_the_handlers():
    before = {sig: signal.getsignal(sig) for sig in GracefulStop.SIGNALS}
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: stop.requested) and stop.signal == signal.SIGTERM
        assert stop.installed
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what ray.init() does, in its own way
        assert not stop.installed
    assert {sig: signal.getsignal(sig) for sig in GracefulStop.SIGNALS} == before


def test_a_second_sigint_interrupts():
    with pytest.raises(KeyboardInterrupt):
        with GracefulStop() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert wait_for(lambda: stop.requested)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(2)
    assert stop.signal == signal.SIGINT


def test_training_stopped_carries_the_step_and_folder(tmp_path):
    stopped = TrainingStopped(7, tmp_path)
    assert (stopped.step, stopped.checkpoint) == (7, tmp_path) and "after step 7" in str(stopped)


# --------------------------------------------------------------------------------------------
# Exact resume of the real loop

WORDS = ["<pad>", "<eos>", "yes", "sure", "no", "maybe", "red", "blue", "one", "two", "cat",
         "dog", "sun", "moon", "up", "down"]
REWARDED = {"yes", "sure", "no", "maybe"}
LORA = dict(lora_rank=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "up_proj"))


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("word-llama-ckpt")
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                        eos_token="<eos>")
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                         bos_token_id=0, tie_word_embeddings=True, initializer_range=0.2)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path), tokenizer


def score(pairs):
    from verifiers.rewards import RewardResult

    out = []
    for text, _ in pairs:
        first = text.split()[:1]
        out.append(RewardResult(float(bool(first) and first[0] in REWARDED), None, bool(first),
                                False))
    return out


class RecordingEngine:
    """The engine, recording the prompt texts of every generate call."""

    def __init__(self, engine, log: list):
        self.engine, self.log = engine, log

    @property
    def policy_version(self):
        return self.engine.policy_version

    def generate(self, prompts, n, sampling):
        self.log.append([p.text for p in prompts])
        return self.engine.generate(prompts, n, sampling)

    def update_adapter(self, version, tensors):
        self.engine.update_adapter(version, tensors)


class Sink:
    def log(self, step, metrics):
        pass


def build(path, log):
    """A fresh learner and engine, as train.py builds them (lora dropout on: the learner's
    torch RNG matters; warm-up + linear decay: the schedule position matters)."""
    from actors.learner import Learner
    from actors.rollout_hf import HFRolloutEngine

    learner = Learner(path, **LORA, lora_dropout=0.1, lr=2e-2, weight_decay=0.01,
                      warmup_steps=1, total_steps=4, lr_schedule="linear", max_grad_norm=1.0,
                      tis_cap=2.0, seed=0)
    engine = HFRolloutEngine(path, **LORA, seed=0)
    engine.update_adapter(learner.policy_version, learner.export_adapter())
    return learner, RecordingEngine(engine, log)


@pytest.mark.slow
def test_a_resumed_run_continues_exactly(word_model, tmp_path):
    import torch

    from rl.loop import LoopSettings, TrainItem, train
    from rl.records import Prompt, SamplingParams
    from verifiers.rewards import Example

    path, tokenizer = word_model
    torch.set_num_threads(1)
    texts = ["red blue", "one two", "cat dog", "sun moon", "up down", "blue red", "two one"]
    items = [TrainItem(f"p{i}", Prompt(tokenizer(t)["input_ids"], t), Example(truth=0), "words")
             for i, t in enumerate(texts)]
    # sampling.seed set, as train.py sets it: the engine draws from a generator seeded per call,
    # so it holds no RNG state a checkpoint would need.
    settings = LoopSettings(steps=4, prompts_per_step=2, group_size=4, seed=5,
                            sampling=SamplingParams(max_new_tokens=2, temperature=1.0, seed=7))
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=1)

    calls_a: list = []
    learner_a, engine_a = build(path, calls_a)
    calls_before_step = []

    def on_step_end(step, metrics, stream):
        calls_before_step.append(len(calls_a))
        if is_due(step, 2, settings.steps):
            manager.save(step + 1, learner_a.save_state,
                         {"data_position": stream.position,
                          "policy_version": learner_a.policy_version})

    history_a = train(items, engine_a, learner_a, score, settings, Sink(), on_step_end=on_step_end)
    assert sorted(p.name for p in manager.root.iterdir()) == ["latest", "step_000004"]  # keep_last=1

    # The interrupted run: a fresh process would start here, from the step-2 checkpoint (saved
    # again below from a run stopped after 2 steps, as a SIGTERM after step 2 would).
    calls_b: list = []
    learner_b, engine_b = build(path, calls_b)
    stop_manager = CheckpointManager(tmp_path / "stopped", keep_last=1)

    def stop_after_two(step, metrics, stream):
        if step + 1 == 2:
            folder = stop_manager.save(step + 1, learner_b.save_state,
                                       {"data_position": stream.position,
                                        "policy_version": learner_b.policy_version})
            raise TrainingStopped(step + 1, folder)

    with pytest.raises(TrainingStopped) as stopped:
        train(items, engine_b, learner_b, score, settings, Sink(), on_step_end=stop_after_two)
    del learner_b, engine_b

    checkpoint = stop_manager.resolve(True)
    assert checkpoint == stopped.value.checkpoint
    meta = read_meta(checkpoint)
    calls_c: list = []
    learner_c, engine_c = build(path, calls_c)
    learner_c.load_state(checkpoint)
    engine_c.update_adapter(learner_c.policy_version, learner_c.export_adapter())
    restore_rng(meta["rng"])
    history_c = train(items, engine_c, learner_c, score, settings, Sink(),
                      start_step=meta["step"], data_position=meta["data_position"])

    assert meta["step"] == 2 and meta["policy_version"] == history_a[1]["policy_version"]
    assert calls_c == calls_a[calls_before_step[1]:]  # the same prompts, in the same calls
    keys = ("reward/mean", "learn/loss", "learn/lr", "learn/grad_norm", "policy_version",
            "data/position", "groups/kept")
    for a, c in zip(history_a[2:], history_c):
        assert {k: a.get(k) for k in keys} == pytest.approx({k: c.get(k) for k in keys},
                                                            rel=1e-6, abs=1e-7)
    assert learner_c.policy_version == learner_a.policy_version > meta["policy_version"]
    final_a, final_c = learner_a.export_adapter(), learner_c.export_adapter()
    for name in final_a:
        torch.testing.assert_close(final_c[name], final_a[name], rtol=0, atol=1e-7)
    assert all(torch.equal(engine_c.engine.adapter_state()[n], final_c[n]) for n in final_c)
