"""Train an API adapter with GRPO: ``api-adapter train --config configs/cpu_t1.yaml``.

The algorithm: GRPO with a verifiable binary reward (the adapter's resolved answer equals
the truth). Per step, ``prompts_per_step`` tasks each get ``group_size`` sampled completions;
advantages are the group-centred rewards (divided by the group's std by default); groups
whose rewards are all equal are dropped and refilled; one clipped-surrogate optimizer step
(clip-higher, token-mean aggregation, optional k3 KL to the adapter-free model, truncated
importance weights against the sampler's log-probs) updates the LoRA adapter, whose tensors
then go to the rollout engine under a new version. Left out: a value function, entropy
bonus, multiple optimizer epochs per batch.

Before training, every task's upstream answer is fetched once (cached on disk: a rerun pays
for nothing twice) and written into the adapter's prompt. The run folder gets the resolved
config, the data, ``metrics.jsonl``, checkpoints (PEFT folders) and ``results.json`` with the
held-out accuracy before and after training.

With ``cluster.mode: ray`` (the default) the pieces run as Ray actors: a local cluster is
started when ``cluster.address`` names none, and ``ray job submit`` runs this same entry on a
cluster; ``cluster.mode: in_process`` runs everything in this process. Heavy imports are deferred
so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# Run as a file (also by `ray job submit --working-dir .`): import this checkout's packages.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl.interfaces import sync_adapter  # noqa: E402  (light: no torch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML config (defaults: rl/config.py)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set algorithm.steps=20 (repeatable)")
    parser.add_argument("--help-config", nargs="?", const="", metavar="SECTION",
                        help="print the config reference (all sections, or one) and exit")
    return parser


def _symbol_tasks(config, run: Path):
    """The train/test tasks: the config's files, or a generated symbol dataset in the run."""
    from rl.datasets import read_tasks
    from verifiers.symbol_data import LADDER, SEED_TIER, build_symbol_dataset, write_jsonl

    data = config.data
    train_path, test_path = data.train_path, data.test_path
    if train_path is None or test_path is None:
        tier = {t.name: t for t in (SEED_TIER, *LADDER)}[data.tier]
        train, test = build_symbol_dataset(data.n_per_type, data.seed, data.test_fraction, tier,
                                           unique=data.unique)
        train_path = train_path or run / "data" / "train.jsonl"
        test_path = test_path or run / "data" / "test.jsonl"
        if data.train_path is None:
            write_jsonl(train, train_path)
        if data.test_path is None:
            write_jsonl(test, test_path)
    train_tasks, _ = read_tasks(train_path, data.task)
    test_tasks, _ = read_tasks(test_path, data.task, limit=config.eval.n_items)
    return train_tasks, test_tasks


def _requests(config, tasks) -> list:
    from actors.upstream import UpstreamRequest

    up = config.upstream
    request = UpstreamRequest.gsm8k if config.data.task == "gsm8k" else UpstreamRequest.symbol
    return [request(t.prompt, max_tokens=up.max_tokens, temperature=up.temperature) for t in tasks]


def _answer_in_process(config, run: Path, requests, spent: list[int]) -> list:
    """Every request's upstream answer through the run's on-disk cache, in this process;
    ``spent[0]``: the run's provider calls so far (``upstream.max_requests`` bounds the run)."""
    from actors.upstream import AnswerCache, UpstreamClient, build_provider
    from cluster.build import provider_kwargs

    limit = config.upstream.max_requests
    cache = AnswerCache(config.upstream.cache_path or run / "upstream_cache.sqlite")
    client = UpstreamClient(build_provider(**provider_kwargs(config)), cache,
                            concurrency=config.upstream.max_concurrency,
                            max_requests=None if limit is None else limit - spent[0])

    async def answer_all():
        try:
            return await client.answer_all_with_progress(list(requests))
        finally:
            await client.aclose()

    try:
        return asyncio.run(answer_all())
    finally:
        spent[0] += client.calls_started
        cache.close()


def _items(config, tokenizer, tasks, api_answers):
    from rl.loop import TrainItem
    from rl.prompts import adapter_prompt
    from verifiers.rewards import Example

    prefix = config.rollout.response_prefix or ""
    return [TrainItem(task.uid, adapter_prompt(tokenizer, task.prompt, api, config.data.condition,
                                               response_prefix=prefix, answer_format=config.data.answer_format,
                                               thinking=config.model.chat_template_thinking),
                      Example(truth=task.truth, api_answer=api, question=task.prompt), task.category)
            for task, api in zip(tasks, api_answers)]


@dataclass
class Parts:
    """The loop's engine, learner and scorer, how upstream answers are fetched, and teardown."""

    engine: Any
    learner: Any
    score: Callable
    answer_all: Callable
    close: Callable[[], None]


def _in_process(config, run: Path) -> Parts:
    from actors.engines import build_engine
    from actors.learner import Learner
    from cluster.build import device_for, engine_spec, learner_kwargs
    from verifiers.rewards import get_reward

    learner = Learner(**learner_kwargs(config, device_for(config.cluster.learner_gpus)))
    engine = build_engine(*engine_spec(config, device_for(config.cluster.rollout_gpus_per_engine),
                                       config.rollout.gpu_memory_utilization))
    sync_adapter(engine, learner)  # one starting point
    reward = get_reward("binary")
    spent = [0]
    return Parts(engine, learner, lambda pairs: [reward(t, e) for t, e in pairs],
                 lambda requests: _answer_in_process(config, run, requests, spent), lambda: None)


def _on_ray(config, run: Path) -> Parts:
    import ray

    from cluster.build import build_ray, connect

    connect(config.cluster.address)
    parts = build_ray(config, run)
    return Parts(parts.engine, parts.learner, parts.score,
                 lambda requests: ray.get(parts.upstream.answer_all.remote(requests)), parts.shutdown)


def _sampling(config, evaluation: bool):
    from rl.records import SamplingParams

    if evaluation:
        return SamplingParams(max_new_tokens=config.eval.max_new_tokens, temperature=config.eval.temperature,
                              stop=tuple(config.rollout.stop))
    r = config.rollout
    return SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                          top_k=r.top_k, stop=tuple(r.stop), seed=r.seed)


def _evaluate(engine, items, config, run: Path, label: str) -> dict:
    from rl.evaluation import evaluate_items, format_table

    summary, rows = evaluate_items(engine, items, _sampling(config, evaluation=True), progress=f"eval {label}")
    with (run / f"eval_{label}.jsonl").open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(vars(row)) + "\n")
    print(format_table(summary, f"held-out accuracy, {label} (policy version {engine.policy_version}):"))
    return summary


def run(config) -> dict:
    import torch

    from rl.config import dump_config
    from rl.storage import is_remote, pull_run_files, run_dir, run_location

    if config.rollout.engine == "vllm":  # before any work: no upstream call, no model load
        from actors.rollout_vllm import require_vllm

        require_vllm()
    torch.manual_seed(config.learner.seed)
    run = run_dir(config)
    run.mkdir(parents=True, exist_ok=True)
    if is_remote(run_location(config)):  # its metrics and paid-for answers, on whichever host
        pull_run_files(run_location(config), run)
    dump_config(config, run / "config.yaml")
    train_tasks, test_tasks = _symbol_tasks(config, run)
    parts = (_on_ray if config.cluster.mode == "ray" else _in_process)(config, run)
    try:
        return _train_and_evaluate(config, run, parts, train_tasks, test_tasks)
    except Exception as error:
        if config.cluster.mode == "ray":
            from cluster.build import raise_if_actor_lost
            from rl.checkpoint import run_checkpoints

            raise_if_actor_lost(error, run_checkpoints(config))
        raise
    finally:
        parts.close()


def _train_and_evaluate(config, run: Path, parts: Parts, train_tasks, test_tasks) -> dict:
    from actors.models import load_tokenizer
    from rl.loop import LoopSettings, train
    from rl.checkpoint import GracefulStop, TrainingStopped, is_due, run_checkpoints
    from rl.metrics import sinks_for
    from rl.storage import run_location, sync_run_files

    answers = parts.answer_all(_requests(config, train_tasks + test_tasks))
    print(f"upstream: {len(answers)} answers ({sum(a.cached for a in answers)} from the cache), "
          f"{sum(a.answer is None for a in answers)} without a number")
    api_answers = [a.answer for a in answers]
    tokenizer = load_tokenizer(config.model.name_or_path, config.model.trust_remote_code)
    train_items = _items(config, tokenizer, train_tasks, api_answers[: len(train_tasks)])
    test_items = _items(config, tokenizer, test_tasks, api_answers[len(train_tasks):])
    engine, learner = parts.engine, parts.learner
    manager = run_checkpoints(config)
    start_step, position, meta = _resume(config, manager, engine, learner)
    results = {"run_dir": run_location(config), "resumed_from_step": start_step}
    spent_s = 0.0
    if start_step == 0:
        from rl.trackers import RUNS_FILE

        for fresh in ("metrics.jsonl", RUNS_FILE):  # a new run logs anew (a resumed one goes on)
            (run / fresh).unlink(missing_ok=True)
        if config.eval.at_start:
            results["before"] = _evaluate(engine, test_items, config, run, "before")
        if config.sft.steps:
            results["sft"] = _sft_stage(config, run, tokenizer, train_items, engine, learner)
            spent_s = results["sft"]["seconds"]
            if config.eval.at_start:
                results["after_sft"] = _evaluate(engine, test_items, config, run, "after_sft")

    algo = config.algorithm
    settings = LoopSettings(
        steps=algo.steps, prompts_per_step=algo.prompts_per_step, group_size=config.rollout.group_size,
        sampling=_sampling(config, evaluation=False), advantage_scale=algo.advantage_scale,
        filter_zero_variance=algo.filter_zero_variance, max_refill_rounds=algo.max_refill_rounds,
        seed=config.data.seed, time_budget_s=algo.max_train_seconds, stall_steps=config.logging.stall_steps,
        max_policy_lag=algo.async_off_policy_steps, shuffle=config.data.shuffle)
    from rl.curriculum import resolve_stages

    total = sum(s.steps for s in resolve_stages(config)) if config.curriculum else algo.steps  # an upper bound
    sink = sinks_for(config.logging.tracker, run, config.logging.name, dataclasses.asdict(config), total)
    if config.cluster.mode == "ray":
        from cluster.metrics import RayMetricsSink
        from rl.metrics import FanOut

        sink = FanOut(sink, RayMetricsSink(config.logging.name))
    start = time.perf_counter()
    last: dict = {}  # the last step, its data stream, and its checkpoint (None: not saved)
    # GracefulStop is entered after ray.init, which installs a SIGTERM handler of its own.
    with GracefulStop() as stop, contextlib.closing(sink):
        def on_step_end(step: int, metrics: dict, stream, extra=None, boundary=False) -> None:
            due = boundary or is_due(step, config.checkpoint.every_steps, 0 if extra else algo.steps)
            folder = _save(config, manager, run, learner, step, stream, extra) if due or stop.requested else None
            last.update(step=step, stream=stream, folder=folder, extra=extra)
            if stop.requested:
                raise TrainingStopped(step + 1, folder)

        try:
            if config.curriculum:  # rl/curriculum.py: the stages in order, from the checkpoint's position
                history, results["curriculum"] = _curriculum(config, run, parts, tokenizer, settings, sink,
                                                             on_step_end, start_step, meta, test_items, spent_s)
            else:
                history = train(train_items, engine, learner, parts.score, settings, sink,
                                on_step_end=on_step_end, start_step=start_step, data_position=position,
                                evaluate=_periodic_eval(config, engine, test_items), spent_s=spent_s)
        except TrainingStopped as stopped:
            print(f"stopped by signal after step {stopped.step}; checkpoint {stopped.checkpoint}; "
                  f"continue with --set checkpoint.resume=true")
            return {**results, "stopped_at_step": stopped.step}
    if last and last["folder"] is None:  # the time budget ended the run between scheduled saves
        _save(config, manager, run, learner, last["step"], last["stream"], last["extra"])
    results["train_seconds"] = spent_s + (history[-1]["time/train_seconds"] - spent_s if history else 0.0)
    results["steps"] = start_step + len(history)
    results["reward_curve"] = [round(m["reward/mean"], 4) for m in history]
    results["after"] = _evaluate(engine, test_items, config, run, "after")
    (run / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {run / 'results.json'}")
    from rl.report import report_from_run

    paths = report_from_run(run)
    print(f"report: {paths['report']}")
    sync_run_files(run, run_location(config))
    return results


def _sft_stage(config, run: Path, tokenizer, items, engine, learner) -> dict:
    """The format warm-start (rl/sft.py) on the GRPO learner; the engine gets the result and the
    adapter is saved to RUN/sft/adapter (a starting point by path: lora.init_from)."""
    from rl.metrics import ConsoleSink, FanOut, JsonlSink
    from rl.sft import format_targets, run_sft, sft_groups, standard_batches, surrogate_batches

    data, sft = config.data, config.sft
    if sft.items == "surrogate":
        batches = surrogate_batches(items, tokenizer, data.condition, data.answer_format, sft.batch_size, data.seed)
    else:
        groups = sft_groups(format_targets(items, data.condition, data.answer_format), tokenizer)
        batches = standard_batches(groups, sft.batch_size, data.seed)
    budget = config.algorithm.max_train_seconds
    start = time.perf_counter()
    sink = FanOut(ConsoleSink(phase="sft warm-start", total=sft.steps), JsonlSink(run / "sft_metrics.jsonl"))
    (run / "sft_metrics.jsonl").unlink(missing_ok=True)
    history = run_sft(learner, batches, sft.steps, sink.log,
                      out_of_time=lambda: budget is not None and time.perf_counter() - start >= budget)
    seconds = time.perf_counter() - start
    sync_adapter(engine, learner)
    adapter = learner.save_adapter(run / "sft" / "adapter")
    print(f"SFT warm-start: {len(history)} steps of {sft.batch_size} {sft.items} examples in {seconds:.0f} s; "
          f"loss {history[0]['sft/loss']:.3f} -> {history[-1]['sft/loss']:.3f}; adapter {adapter}", flush=True)
    return {"steps": len(history), "items": sft.items, "seconds": seconds, "adapter": str(adapter),
            "loss_first": history[0]["sft/loss"], "loss_last": history[-1]["sft/loss"]}


def _periodic_eval(config, engine, items):
    """Every ``eval.every_steps``: held-out accuracy as ``eval/*`` metrics (overall, per
    category, per symbol), logged with the step so the curves show what was learned when."""
    from rl.evaluation import evaluate_items

    every = config.eval.every_steps
    if not every:
        return None

    def evaluate(step: int) -> dict:
        if (step + 1) % every:
            return {}
        summary, _ = evaluate_items(engine, items, _sampling(config, evaluation=True))
        metrics = {f"eval/{name}": summary[name]["accuracy"] for name in ("overall", *summary.get("categories", ()))}
        metrics.update({f"eval/symbol/{symbol}": value["accuracy"]
                        for symbol, value in summary.get("by_symbol", {}).items()})
        return metrics

    return evaluate


def _curriculum(config, run: Path, parts: Parts, tokenizer, settings, sink, on_step_end, start_step, meta,
                test_items, spent_s):
    """The curriculum's stages (rl/curriculum.py); each stage's items get their upstream answers
    through the same cache. Returns (history, the stages' results for results.json)."""
    from rl.curriculum import Position, resolve_stages, run_curriculum, stage_data

    def items_for(stage):
        stage_config = dataclasses.replace(config, data=stage_data(config.data, stage))
        tasks, _ = _symbol_tasks(stage_config, run / "stages" / stage.name)
        answers = parts.answer_all(_requests(config, tasks))
        return _items(config, tokenizer, tasks, [a.answer for a in answers])

    history, position = run_curriculum(
        resolve_stages(config), Position.from_meta(meta.get("curriculum")), start_step, items_for=items_for,
        engine=parts.engine, learner=parts.learner, score=parts.score, settings=settings, sink=sink,
        warmup_fraction=config.learner.warmup_fraction, on_step_end=on_step_end,
        evaluate=_periodic_eval(config, parts.engine, test_items), spent_s=spent_s)
    return history, {"stages": position.summary(resolve_stages(config))}


def _resume(config, manager, engine, learner) -> tuple[int, int, dict]:
    """Load the checkpoint ``checkpoint.resume`` names (if any); ``(start_step, data_position,
    meta)``."""
    from rl.checkpoint import read_meta, restore_rng

    folder = manager.resolve(config.checkpoint.resume)
    if folder is None:
        return 0, 0, {}
    meta = read_meta(folder)
    learner.load_state(folder)
    sync_adapter(engine, learner)  # the engines follow
    restore_rng(meta["rng"])
    print(f"resumed from {manager.origin.get(folder, folder)}: step {meta['step']}, data position {meta['data_position']}, "
          f"policy version {learner.policy_version}")
    return meta["step"], meta["data_position"], meta


def _save(config, manager, run: Path, learner, step: int, stream, extra: dict | None = None) -> Path | str:
    """Checkpoint after 0-based ``step``; a run in a store copies its other files there too."""
    import shutil

    from rl.checkpoint import sha256_file
    from rl.storage import run_location, sync_run_files

    def write(folder: Path) -> None:
        learner.save_state(folder)
        shutil.copy(run / "config.yaml", folder / "config.yaml")

    saved = manager.save(step + 1, write, {"data_position": stream.position, "policy_version": learner.policy_version,
                                           "config_sha256": sha256_file(run / "config.yaml"), **(extra or {})})
    sync_run_files(run, run_location(config))
    return saved


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rl.config import ConfigError, describe, load_config

    try:
        if args.help_config is not None:
            print(describe(args.help_config or None))
            return 0
        config = load_config(args.config, args.set)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    elsewhere = sft_stage_knobs(config)
    if elsewhere:
        print(f"error: {', '.join(elsewhere)}: rationale SFT and self-distillation run with `api-adapter sft` "
              f"(scripts/sft.py); this command's SFT stage is the format warm-start (sft.steps, sft.items, "
              f"sft.batch_size, sft.lr)", file=sys.stderr)
        return 2
    from actors.rollout_vllm import VLLMUnavailable
    from actors.upstream import UpstreamBudgetExceeded
    from rl.checkpoint import RunAborted

    try:
        run(config)
    except (RunAborted, UpstreamBudgetExceeded) as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except VLLMUnavailable as error:
        print(f"error: rollout.engine vllm: {error}", file=sys.stderr)
        return 2
    return 0


def sft_stage_knobs(config) -> list[str]:
    """The ``sft`` knobs set away from their defaults that only scripts/sft.py reads (a run
    here would silently ignore them)."""
    from rl.config import SftConfig

    names = ("data_path", "batch_tokens", "eval_every", "distill_rounds")
    return [f"sft.{n}={getattr(config.sft, n)!r}" for n in names
            if getattr(config.sft, n) != getattr(SftConfig(), n)]


if __name__ == "__main__":
    sys.exit(main())
