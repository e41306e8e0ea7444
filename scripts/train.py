"""Train an API adapter with GRPO: ``python scripts/train.py --config configs/cpu.yaml``.

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

This entry runs everything in one process (CPU or one GPU). Heavy imports are deferred so
``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path


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
        train, test = build_symbol_dataset(data.n_per_type, data.seed, data.test_fraction, tier)
        train_path = train_path or run / "data" / "train.jsonl"
        test_path = test_path or run / "data" / "test.jsonl"
        if data.train_path is None:
            write_jsonl(train, train_path)
        if data.test_path is None:
            write_jsonl(test, test_path)
    train_tasks, _ = read_tasks(train_path, data.task)
    test_tasks, _ = read_tasks(test_path, data.task, limit=config.eval.n_items)
    return train_tasks, test_tasks


def _upstream_answers(config, run: Path, tasks) -> list:
    """Every task's upstream answer, through the on-disk cache."""
    from actors.upstream import AnswerCache, RetryPolicy, UpstreamClient, UpstreamRequest, build_provider

    up = config.upstream
    provider = build_provider(up.provider, None if up.model == "embedded" and up.provider != "local" else up.model,
                              base_url=up.base_url, project=up.project, region=up.region,
                              timeout=up.timeout_s, retry=RetryPolicy(max_attempts=up.max_retries + 1))
    cache = AnswerCache(up.cache_path or run / "upstream_cache.sqlite")
    client = UpstreamClient(provider, cache, concurrency=up.max_concurrency)
    requests = [UpstreamRequest.symbol(t.prompt, max_tokens=up.max_tokens, temperature=up.temperature)
                for t in tasks]

    async def answer_all():
        try:
            return await client.answer_all(requests)
        finally:
            await client.aclose()

    try:
        answers = asyncio.run(answer_all())
    finally:
        cache.close()
    print(f"upstream: {len(answers)} answers ({client.tally.cache_hits} from the cache), "
          f"{sum(a.answer is None for a in answers)} without a number")
    return [a.answer for a in answers]


def _items(config, tokenizer, tasks, api_answers):
    from rl.loop import TrainItem
    from rl.prompts import adapter_prompt
    from verifiers.rewards import Example

    prefix = config.rollout.response_prefix or ""
    return [TrainItem(task.uid, adapter_prompt(tokenizer, task.prompt, api, config.data.condition,
                                               response_prefix=prefix),
                      Example(truth=task.truth, api_answer=api, question=task.prompt), task.category)
            for task, api in zip(tasks, api_answers)]


def _build(config):
    """The rollout engine and the learner, in this process (on the GPU when the config gives
    the learner one and CUDA is there)."""
    import torch

    from actors.learner import Learner
    from actors.rollout_hf import HFRolloutEngine

    device = "cuda" if config.cluster.learner_gpus > 0 and torch.cuda.is_available() else "cpu"

    lora = dict(lora_rank=config.lora.rank, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                target_modules=config.lora.target_modules, init_adapter=config.lora.init_from)
    learner_cfg, algo = config.learner, config.algorithm
    learner = Learner(
        config.model.name_or_path, **lora, use_rslora=config.lora.use_rslora, lr=learner_cfg.lr,
        weight_decay=learner_cfg.weight_decay, betas=(learner_cfg.adam_beta1, learner_cfg.adam_beta2),
        eps=learner_cfg.adam_eps, warmup_steps=round(learner_cfg.warmup_fraction * algo.steps),
        total_steps=algo.steps, lr_schedule=learner_cfg.lr_schedule, max_grad_norm=learner_cfg.max_grad_norm,
        zero_stage=learner_cfg.zero_stage, micro_batch_tokens=learner_cfg.micro_batch_tokens,
        precision=learner_cfg.precision, gradient_checkpointing=learner_cfg.gradient_checkpointing,
        clip_eps_low=algo.clip_eps_low, clip_eps_high=algo.clip_eps_high, kl_coef=algo.kl_coef,
        loss_aggregation=algo.loss_aggregation, tis_cap=algo.tis_cap, mask_truncated=algo.mask_truncated,
        temperature=config.rollout.temperature, seed=learner_cfg.seed,
        constant_normaliser=config.rollout.max_new_tokens, optimizer=learner_cfg.optimizer, device=device,
    )
    engine = HFRolloutEngine(config.model.name_or_path, **lora, seed=config.rollout.seed, device=device)
    engine.update_adapter(learner.policy_version, learner.export_adapter())  # one starting point
    return engine, learner


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

    summary, rows = evaluate_items(engine, items, _sampling(config, evaluation=True))
    with (run / f"eval_{label}.jsonl").open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(vars(row)) + "\n")
    print(format_table(summary, f"held-out accuracy, {label} (policy version {engine.policy_version}):"))
    return summary


def run(config) -> dict:
    import torch

    from rl.config import dump_config, run_dir
    from rl.loop import LoopSettings, train
    from rl.metrics import ConsoleSink, FanOut, JsonlSink, NullSink
    from verifiers.rewards import get_reward

    torch.manual_seed(config.learner.seed)
    run = run_dir(config)
    run.mkdir(parents=True, exist_ok=True)
    dump_config(config, run / "config.yaml")
    train_tasks, test_tasks = _symbol_tasks(config, run)
    api_answers = _upstream_answers(config, run, train_tasks + test_tasks)
    engine, learner = _build(config)
    train_items = _items(config, engine.tokenizer, train_tasks, api_answers[: len(train_tasks)])
    test_items = _items(config, engine.tokenizer, test_tasks, api_answers[len(train_tasks):])
    results = {"run_dir": str(run)}
    if config.eval.at_start:
        results["before"] = _evaluate(engine, test_items, config, run, "before")

    reward = get_reward("binary")
    algo = config.algorithm
    settings = LoopSettings(
        steps=algo.steps, prompts_per_step=algo.prompts_per_step, group_size=config.rollout.group_size,
        sampling=_sampling(config, evaluation=False), advantage_scale=algo.advantage_scale,
        filter_zero_variance=algo.filter_zero_variance, max_refill_rounds=algo.max_refill_rounds,
        seed=config.data.seed)
    sink = FanOut(ConsoleSink(), JsonlSink(run / "metrics.jsonl") if config.logging.tracker == "jsonl" else NullSink())

    def checkpoint(step: int, metrics: dict, stream) -> None:
        every = config.checkpoint.every_steps
        if (every and (step + 1) % every == 0) or step + 1 == algo.steps:
            learner.save_adapter(run / "checkpoints" / f"step_{step + 1:06d}")

    start = time.perf_counter()
    history = train(train_items, engine, learner, lambda pairs: [reward(t, e) for t, e in pairs],
                    settings, sink, on_step_end=checkpoint)
    results["train_seconds"] = time.perf_counter() - start
    results["steps"] = len(history)
    results["reward_curve"] = [round(m["reward/mean"], 4) for m in history]
    results["after"] = _evaluate(engine, test_items, config, run, "after")
    (run / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {run / 'results.json'}")
    from rl.report import report_from_run

    paths = report_from_run(run)
    print(f"report: {paths['report']}")
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rl.config import ConfigError, describe, load_config

    if args.help_config is not None:
        print(describe(args.help_config or None))
        return 0
    try:
        config = load_config(args.config, args.set)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
