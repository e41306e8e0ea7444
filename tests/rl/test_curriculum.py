"""Curricula (rl/curriculum.py): the config's stages, advancing on a reward threshold or on steps,
the stage on every metric row and in checkpoint meta, an exact resume mid-stage; the learner's
per-stage settings; and the whole entry (scripts/train.py) stopped mid-stage and resumed."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from rl.config import ConfigError, dump_config, load_config
from rl.curriculum import AdvanceWatch, Position, resolve_stages, run_curriculum
from rl.loop import LoopSettings, TrainItem
from rl.records import Completion, Prompt, SamplingParams
from verifiers.rewards import Example, get_reward

TWO_STAGES = """\
algorithm:
  prompts_per_step: 2
curriculum:
  - name: easy
    tier: t1
    advance_at: 0.6
    window: 2
    max_steps: 5
    lr: 1.0e-3
  - name: hard
    tier: t2
    steps: 3
    temperature: 0.7
    max_new_tokens: 32
"""


# --------------------------------------------------------------------------- config
def test_stages_load_inherit_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(TWO_STAGES)
    config = load_config(path)
    easy, hard = resolve_stages(config)
    assert (easy.name, easy.tier, easy.steps, easy.advance_at, easy.lr) == ("easy", "t1", 5, 0.6, 1e-3)
    assert (hard.steps, hard.advance_at, hard.temperature, hard.max_new_tokens) == (3, None, 0.7, 32)
    assert hard.lr == config.learner.lr and easy.temperature == config.rollout.temperature  # inherited
    assert load_config(dump_config(config, tmp_path / "dumped.yaml")) == config
    assert load_config().curriculum == ()


@pytest.mark.parametrize("stage, key, problem", [
    ("{name: a, steps: 3, advance_at: 0.5, max_steps: 4}", "curriculum[1].steps", "by steps or by advance_at"),
    ("{name: a}", "curriculum[1].steps", "by steps or by advance_at"),
    ("{name: a, advance_at: 0.5}", "curriculum[1].advance_at", "needs a bound"),
    ("{name: a, steps: 2, max_steps: 4}", "curriculum[1].max_steps", "threshold stage only"),
    ("{name: easy, steps: 2}", "curriculum[1].name", "a second stage"),
    ("{name: a, steps: 2, advance_at: 1.5}", "curriculum[1].advance_at", "out of range"),
    ("{name: a, stepz: 2}", "curriculum[1].stepz", "did you mean 'steps'"),
    ("{name: a, steps: 2, tier: t9}", "curriculum[1].tier", "not one of the choices"),
])
def test_a_bad_stage_is_an_error_naming_its_key_and_line(tmp_path, stage, key, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(f"curriculum:\n  - {{name: easy, steps: 2}}\n  - {stage}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"bad.yaml:3: {key}" in str(err.value) and problem in str(err.value)


def test_the_curriculum_must_be_a_list_of_mappings(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("curriculum:\n  name: easy\n")
    with pytest.raises(ConfigError, match="bad.yaml:1: curriculum = .*expected a list"):
        load_config(path)


# --------------------------------------------------------------------------- the runner (stand-ins)
class ScriptedEngine:
    """Answers ``7}`` (right) for prompts whose text starts with "r", ``8}`` (wrong) otherwise,
    with one wrong answer in every group of a "mixed" prompt."""

    def __init__(self):
        self.policy_version, self.sampling = 0, []

    def generate(self, prompts, n, sampling):
        self.sampling.append(sampling)
        out = []
        for i, prompt in enumerate(prompts):
            for s in range(n):
                text = "7}" if prompt.text[0] == "r" or (prompt.text[0] == "m" and s == 0) else "8}"
                out.append(Completion(i, s, [1, 2], [-0.5, -0.5], text, "stop", self.policy_version))
        return out

    def update_adapter(self, version, tensors):
        self.policy_version = version


@dataclass
class Stats:
    loss: float


class RecordingLearner:
    def __init__(self):
        self.policy_version, self.stages, self.uids = 0, [], []

    def configure_stage(self, **settings):
        self.stages.append(settings)

    def train_step(self, groups):
        self.policy_version += 1
        return Stats(loss=0.5)

    def export_adapter(self):
        return {}


class Sink:
    def __init__(self):
        self.rows = []

    def log(self, step, metrics):
        self.rows.append({"step": step, **metrics})


def score(pairs):
    return [get_reward("binary")(text, example) for text, example in pairs]


def _items(kinds: str, tag: str) -> list[TrainItem]:
    """One item per letter of ``kinds``: r (always right), w (always wrong), m (half right)."""
    return [TrainItem(f"{tag}{k}", Prompt([k], f"{kind}{k}", response_prefix="\\boxed{"),
                      Example(truth=7, api_answer=7), "custom") for k, kind in enumerate(kinds)]


def _stages(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return resolve_stages(load_config(path))


ITEMS = {"easy": _items("rrrrrm", "e"), "hard": _items("wwwwwm", "h"), "mid": _items("rmwmrwmr", "m")}


def _run(stages, position=None, start_step=0, stop_after=None):
    """Run the curriculum on the stand-ins; ``stop_after``: raise out of the step-end hook after
    that global step (a stopped job), returning the meta its checkpoint would hold."""
    engine, learner, sink, saved = ScriptedEngine(), RecordingLearner(), Sink(), []

    def on_step_end(step, metrics, stream, meta, boundary):
        saved.append((step, json.loads(json.dumps(meta)), boundary))
        if step == stop_after:
            raise KeyboardInterrupt

    settings = LoopSettings(steps=999, prompts_per_step=2, group_size=2, filter_zero_variance=False,
                            sampling=SamplingParams(max_new_tokens=16, temperature=1.0, seed=0), seed=2)
    try:
        history, position = run_curriculum(
            stages, position or Position(), start_step, items_for=lambda stage: ITEMS[stage.name], engine=engine,
            learner=learner, score=score, settings=settings, sink=sink, warmup_fraction=0.0,
            on_step_end=on_step_end)
    except KeyboardInterrupt:
        history, position = None, None
    return dict(history=history, position=position, engine=engine, learner=learner, rows=sink.rows, saved=saved)


STAGES = """\
curriculum:
  - {name: easy, advance_at: 0.9, window: 2, max_steps: 6, lr: 1.0e-3}
  - {name: hard, advance_at: 0.5, window: 2, max_steps: 3, temperature: 0.5, max_new_tokens: 8}
  - {name: mid, steps: 4}
"""


def test_a_stage_advances_on_its_threshold_and_a_missed_one_runs_to_max_steps(tmp_path):
    out = _run(_stages(tmp_path, STAGES))
    # easy: rewards ~1 (one wrong answer in the m item's group), the 2-step mean reaches 0.9 at step 2;
    # hard: rewards ~0, never 0.5, so max_steps (3) ends it; mid: its 4 steps.
    assert out["position"].done == [
        {"stage": 0, "name": "easy", "steps": 2, "ended_by": "threshold"},
        {"stage": 1, "name": "hard", "steps": 3, "ended_by": "steps"},
        {"stage": 2, "name": "mid", "steps": 4, "ended_by": "steps"}]
    rows = out["rows"]
    assert [r["step"] for r in rows] == list(range(9))
    assert [(r["stage"], r["stage/name"], r["stage/step"]) for r in rows] == (
        [(0, "easy", k) for k in range(2)] + [(1, "hard", k) for k in range(3)] + [(2, "mid", k) for k in range(4)])
    assert all(r["sample"]["uid"][0] == r["stage/name"][0] for r in rows)  # each stage its own items
    # the stage's settings reach the learner (once per stage, the schedule restarted) and the sampler
    stages = out["learner"].stages
    assert [(s["lr"], s["temperature"], s["constant_normaliser"]) for s in stages] == [
        (1e-3, 1.0, 512), (5e-6, 0.5, 8), (5e-6, 1.0, 512)]
    assert [s["total_steps"] for s in stages] == [6, 3, 4]
    assert [(s.temperature, s.max_new_tokens) for s in out["engine"].sampling[2:5]] == [(0.5, 8)] * 3
    # checkpoints at every stage end, whose meta points at the next stage's start
    boundaries = [(step, meta["curriculum"]["stage"]) for step, meta, boundary in out["saved"] if boundary]
    assert boundaries == [(1, 1), (4, 2), (8, 3)]


RESUME_STAGES = """\
curriculum:
  - {name: mid, advance_at: 0.7, window: 3, max_steps: 8}
  - {name: easy, steps: 3, lr: 1.0e-4}
"""


@pytest.mark.parametrize("stop_after", [0, 2, 3, 4, 6])  # mid-stage (a partial, a full window), its end, stage 2
def test_a_run_stopped_mid_stage_resumes_exactly(tmp_path, stop_after):
    stages = _stages(tmp_path, RESUME_STAGES)
    whole = _run(stages)
    assert whole["position"].done[0] == {"stage": 0, "name": "mid", "steps": 5, "ended_by": "threshold"}
    stopped = _run(stages, stop_after=stop_after)
    step, meta, _ = stopped["saved"][-1]
    assert step == stop_after and "curriculum" in meta
    resumed = _run(stages, Position.from_meta(meta["curriculum"]), start_step=stop_after + 1)
    key = lambda r: (r["step"], r["stage"], r["stage/step"], r["sample"]["uid"], r["reward/mean"])  # noqa: E731
    assert [key(r) for r in stopped["rows"] + resumed["rows"]] == [key(r) for r in whole["rows"]]
    assert resumed["position"].done == whole["position"].done
    assert [s["restart_schedule"] for s in resumed["learner"].stages][0] == (meta["curriculum"]["stage_step"] == 0)


def test_advance_watch_needs_a_full_window():
    watch = AdvanceWatch(0.5, 3, history=[1.0])
    assert [watch.update(r) for r in (1.0, 0.0, 0.0, 1.0, 1.0)] == [False, True, False, False, True]
    assert not AdvanceWatch(None, 1).update(1.0)


# --------------------------------------------------------------------------- the real learner
def test_the_learner_takes_a_stage_and_resumes_its_schedule(tmp_path):
    from tests.actors.test_learner_state import groups, make_learner  # noqa: PLC0415
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    stage = dict(lr=2e-2, warmup_steps=2, total_steps=4, kl_coef=0.1, temperature=0.7, constant_normaliser=8)
    a = make_learner(str(tmp_path / "model"), lr_schedule="constant")
    a.train_step(groups())
    optimizer = a.engine.optimizer
    a.configure_stage(**stage)
    assert a.engine.get_lr()[0] == 0.0 and a.kl_coef == 0.1 and a.temperature == 0.7  # the stage's warm-up
    assert a.train_step(groups(1)).kl >= 0.0
    assert a.engine.get_lr()[0] == pytest.approx(1e-2)  # 1 of 2 warm-up steps, at the stage's peak 2e-2
    a.save_state(tmp_path / "ckpt")
    assert a.train_step(groups(2)).lr == pytest.approx(1e-2)  # before b: the torch RNG is global
    b = make_learner(str(tmp_path / "model"), lr_schedule="constant")
    b.load_state(tmp_path / "ckpt")
    b.configure_stage(**stage, restart_schedule=False)  # mid-stage: the schedule comes from the checkpoint
    assert b.train_step(groups(2)).lr == pytest.approx(1e-2)
    assert a.engine.get_lr()[0] == b.engine.get_lr()[0] == pytest.approx(2e-2)
    for name, tensor in a.export_adapter().items():
        torch.testing.assert_close(b.export_adapter()[name], tensor, rtol=0, atol=1e-7)
    assert a.engine.optimizer is optimizer and a.engine.optimizer.state  # carried, never rebuilt


# --------------------------------------------------------------------------- the whole entry
@pytest.mark.slow
def test_the_entry_stopped_mid_stage_resumes_to_the_same_adapter(tmp_path):
    """configs/smoke.yaml (the embedded model, in-process) with two stages: t1 for 2 steps, then
    t2 until a threshold of 0 (reached at once). One run straight through; one stopped after
    its first step by the time budget (mid-stage) and resumed: the same steps, stages, prompts
    and final adapter."""
    from safetensors.torch import load_file

    from scripts import train

    cache = tmp_path / "upstream.sqlite"
    stages = tmp_path / "stages.yaml"
    stages.write_text(open("configs/smoke.yaml").read() + (
        "curriculum:\n"
        "  - {name: one, tier: t1, steps: 2, lr: 2.0e-4}\n"
        "  - {name: two, tier: t2, advance_at: 0.0, window: 1, max_steps: 3, max_new_tokens: 12}\n"))

    def run(name, *extra):
        argv = ["--config", str(stages), "--set", f"logging.run_dir={tmp_path / name}",
                "--set", "cluster.mode=in_process", "--set", "eval.at_start=false", "--set", "checkpoint.every_steps=0",
                "--set", "eval.n_items=2", "--set", f"upstream.cache_path={cache}",
                "--set", "algorithm.filter_zero_variance=false"]  # the learner steps at every step
        assert train.main(argv + [x for kv in extra for x in ("--set", kv)]) == 0
        return tmp_path / name

    whole = run("whole")
    assert run("cut", "algorithm.max_train_seconds=0.001") == tmp_path / "cut"
    meta = json.loads((tmp_path / "cut" / "checkpoints" / "step_000001" / "meta.json").read_text())
    assert meta["curriculum"]["stage"] == 0 and meta["curriculum"]["stage_step"] == 1  # mid-stage
    cut = run("cut", "checkpoint.resume=true")
    results = json.loads((whole / "results.json").read_text())
    assert results["curriculum"]["stages"] == [
        {"stage": 0, "name": "one", "steps": 2, "ended_by": "steps"},
        {"stage": 1, "name": "two", "steps": 1, "ended_by": "threshold"}]
    assert json.loads((cut / "results.json").read_text())["curriculum"] == results["curriculum"]

    def rows(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["stage"], r["stage/name"], r["stage/step"], r["sample"]["uid"], r["learn/lr"])
                for r in map(json.loads, lines)]

    assert rows(whole) == rows(cut) and [r[:4] for r in rows(whole)] == [
        (0, 0, "one", 0), (1, 0, "one", 1), (2, 1, "two", 0)]
    final = [load_file(str(d / "checkpoints" / "step_000003" / "adapter" / "adapter_model.safetensors"))
             for d in (whole, cut)]
    for name, tensor in final[0].items():
        torch.testing.assert_close(final[1][name], tensor, rtol=1e-4, atol=1e-6)
