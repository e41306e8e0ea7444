"""SFT stages on GSM8K: rationale SFT, then boundary self-distillation; ``python scripts/sft.py --config configs/gsm8k_rationale.yaml``.

The same learner (DeepSpeed + PEFT LoRA), rollout engine and placement as GRPO
(``scripts/train.py``: in-process or on Ray), with the ``sft`` objective: mean NLL of the
completion tokens only (the prompt is context). Two stages, each optional:

1. rationale SFT -- ``sft.steps`` steps on the rows of ``sft.data_path`` (``{"prompt",
   "completion"}``; ``scripts/rationale_data.py`` writes GSM8K train solutions in the strict
   final-line format), batched by ``sft.batch_tokens`` (or ``sft.batch_size`` examples),
   evaluated every ``sft.eval_every`` steps, checkpointed every ``checkpoint.every_steps``
   (meta: ``stage: sft``, the SFT step, the data position) and resumable with
   ``checkpoint.resume``;
2. self-distillation -- ``sft.distill_rounds`` rounds of rl/distill.py: sample the current model
   on the next ``sft.distill_questions`` training questions, keep the clean correct samples,
   ``sft.distill_steps`` SFT steps on them. Its effect on the held-out questions (greedy, before
   the first round vs after the last) is a paired bootstrap in ``RUN/distill_report.json``.

The adapter lands in ``RUN/sft/adapter``: the next stage's ``lora.init_from`` (GRPO, or another
SFT stage). Held-out metrics: exact and the answer-boundary counts (rl/evaluation.py) in
``eval_{before,after_sft,after}.jsonl``. Not resumable mid-distillation: a resumed run finishes
the rationale stage and runs the rounds again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl.interfaces import sync_adapter  # noqa: E402  (light: no torch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML config (data.task gsm8k)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override (repeatable)")
    return parser


def _evaluate(engine, items, config, run: Path, label: str):
    from rl.evaluation import evaluate_items, format_table
    from scripts.train import _sampling

    summary, rows = evaluate_items(engine, items, _sampling(config, evaluation=True), reward="gsm8k_exact",
                                   progress=f"eval {label}")
    with (run / f"eval_{label}.jsonl").open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(vars(row)) + "\n")
    print(format_table(summary, f"held-out, {label} (policy version {engine.policy_version}):"), flush=True)
    return summary, rows


def _periodic(config, engine, items):
    from rl.evaluation import evaluate_items
    from rl.sft import eval_metrics
    from scripts.train import _sampling

    every = config.sft.eval_every

    def evaluate(step: int) -> dict:
        if not every or (step + 1) % every:
            return {}
        return eval_metrics(evaluate_items(engine, items, _sampling(config, evaluation=True), "gsm8k_exact")[0])

    return evaluate


def _rationale(config, run: Path, tokenizer, parts, test_items, sink, manager, start_step: int, position: int):
    """Steps ``start_step..sft.steps`` on the rationale rows, checkpointed; returns the history."""
    from rl.checkpoint import is_due
    from rl.sft import rationale_groups, read_rationale, run_sft
    sft, seed = config.sft, config.data.seed
    groups = rationale_groups(read_rationale(sft.data_path), tokenizer)
    batches = _batches(sft, groups, seed, position)

    def on_step_end(step: int, metrics: dict) -> None:
        if is_due(step, config.checkpoint.every_steps, sft.steps):
            save_sft(config, manager, run, parts.learner, step, batches.position)

    return run_sft(parts.learner, batches, sft.steps, sink.log, start_step=start_step,
                   evaluate=_periodic(config, parts.engine, test_items), on_step_end=on_step_end)


def _batches(sft, groups, seed: int, position: int = 0):
    """Batches by token budget (``sft.batch_tokens``), else by count (``sft.batch_size``)."""
    from rl.sft import CountBatches, TokenBudgetBatches

    if sft.batch_tokens:
        return TokenBudgetBatches(groups, sft.batch_tokens, seed, position)
    return CountBatches(groups, sft.batch_size, seed, position)


def _distill(config, parts, tokenizer, train_items, sink, first_step: int) -> list:
    """``sft.distill_rounds`` rounds of sample → filter → SFT (rl/distill.py); each round's stats."""
    from rl.distill import sample_targets
    from rl.loop import ItemStream
    from rl.sft import run_sft, sft_groups
    from scripts.train import _sampling

    sft = config.sft
    stream, rounds, step = ItemStream(train_items, config.data.seed), [], first_step
    for index in range(sft.distill_rounds):
        questions = [next(stream) for _ in range(sft.distill_questions)]
        kept, stats = sample_targets(parts.engine, questions, _sampling(config, evaluation=False),
                                     sft.distill_samples, index)
        print(f"distill round {index}: {stats.samples} samples, kept {stats.kept}, unique {stats.unique}", flush=True)
        rounds.append(stats)
        if not kept:
            continue
        groups = sft_groups(kept, tokenizer)
        for group in groups:
            group.completions[0].append(tokenizer.eos_token_id)
        run_sft(parts.learner, _batches(sft, groups, config.data.seed), step + sft.distill_steps, sink.log,
                start_step=step)
        step += sft.distill_steps
        sync_adapter(parts.engine, parts.learner)
    return rounds


def save_sft(config, manager, run: Path, learner, step: int, position: int) -> Path | str:
    """Checkpoint SFT step ``step`` (0-based) through rl/checkpoint.py; meta adds ``stage: sft``,
    ``sft_step`` (steps done) and the data position. A run in a store copies its files there."""
    import shutil

    from rl.checkpoint import sha256_file
    from rl.storage import run_location, sync_run_files

    def write(folder: Path) -> None:
        learner.save_state(folder)
        shutil.copy(run / "config.yaml", folder / "config.yaml")

    saved = manager.save(step + 1, write, {"stage": "sft", "sft_step": step + 1, "data_position": position,
                                           "policy_version": learner.policy_version,
                                           "config_sha256": sha256_file(run / "config.yaml")})
    sync_run_files(run, run_location(config))
    return saved


def resume_sft(config, manager, engine, learner) -> tuple[int, int]:
    """Load the SFT checkpoint ``checkpoint.resume`` names; ``(sft step, data position)``, (0, 0)
    for a fresh start. A checkpoint of another stage is an error, not silently continued."""
    from rl.checkpoint import CheckpointError, read_meta, restore_rng

    folder = manager.resolve(config.checkpoint.resume)
    if folder is None:
        return 0, 0
    meta = read_meta(folder)
    if meta.get("stage") != "sft":
        raise CheckpointError(f"{folder} is a {meta.get('stage', 'grpo')!r} checkpoint, not an SFT one; "
                              "start the next stage from its adapter (lora.init_from)")
    learner.load_state(folder)
    sync_adapter(engine, learner)
    restore_rng(meta["rng"])
    print(f"resumed SFT from {manager.origin.get(folder, folder)}: step {meta['sft_step']}, data position {meta['data_position']}")
    return meta["sft_step"], meta["data_position"]


def run(config) -> dict:
    from rl.config import dump_config
    from rl.storage import is_remote, pull_run_files, run_dir, run_location

    if config.data.task != "gsm8k" or config.data.test_path is None:
        raise SystemExit("scripts/sft.py runs GSM8K stages: set data.task=gsm8k, data.train_path and data.test_path")
    if config.sft.steps and config.sft.data_path is None:
        raise SystemExit("sft.steps > 0 needs sft.data_path (rationale rows; scripts/rationale_data.py)")
    run = run_dir(config)
    run.mkdir(parents=True, exist_ok=True)
    if is_remote(run_location(config)):
        pull_run_files(run_location(config), run)
    dump_config(config, run / "config.yaml")
    total = config.sft.steps + config.sft.distill_rounds * config.sft.distill_steps
    # Every SFT step at sft.lr: the learner's constant-lr span covers the distillation steps too.
    built = dataclasses.replace(config, sft=dataclasses.replace(config.sft, steps=total))
    from scripts.train import _in_process, _on_ray

    parts = (_on_ray if config.cluster.mode == "ray" else _in_process)(built, run)
    try:
        return _stages(config, run, parts)
    finally:
        parts.close()


def _stages(config, run: Path, parts) -> dict:
    from actors.models import load_tokenizer
    from rl.checkpoint import run_checkpoints
    from rl.datasets import read_tasks
    from rl.distill import effect_report, write_report
    from rl.metrics import ConsoleSink, FanOut, JsonlSink
    from rl.storage import run_location, sync_run_files
    from scripts.evaluate import gsm8k_items

    tokenizer = load_tokenizer(config.model.name_or_path, config.model.trust_remote_code)
    train_items = gsm8k_items(tokenizer, read_tasks(config.data.train_path, "gsm8k")[0])
    test_items = gsm8k_items(tokenizer, read_tasks(config.data.test_path, "gsm8k", limit=config.eval.n_items)[0])
    manager = run_checkpoints(config)
    start_step, position = resume_sft(config, manager, parts.engine, parts.learner)
    if start_step == 0:
        (run / "sft_metrics.jsonl").unlink(missing_ok=True)
    sink = FanOut(ConsoleSink(phase="sft"), JsonlSink(run / "sft_metrics.jsonl"))
    results: dict = {"run_dir": run_location(config), "resumed_from_step": start_step}
    start = time.perf_counter()
    if start_step == 0 and config.eval.at_start:
        results["before"] = _evaluate(parts.engine, test_items, config, run, "before")[0]
    if config.sft.steps:
        history = _rationale(config, run, tokenizer, parts, test_items, sink, manager, start_step, position)
        sync_adapter(parts.engine, parts.learner)
        results["rationale"] = {"steps": config.sft.steps, "loss_first": history[0]["sft/loss"] if history else None,
                                "loss_last": history[-1]["sft/loss"] if history else None}
    if config.sft.distill_rounds:
        results["after_sft"], before_rows = _evaluate(parts.engine, test_items, config, run, "after_sft")
        rounds = _distill(config, parts, tokenizer, train_items, sink, config.sft.steps)
        results["after"], after_rows = _evaluate(parts.engine, test_items, config, run, "after")
        report = effect_report(before_rows, after_rows)
        write_report(run, report, rounds)
        print(report["line"], flush=True)
        results["distill"] = {"line": report["line"], "rounds": [dataclasses.asdict(r) for r in rounds]}
    else:
        results["after"] = _evaluate(parts.engine, test_items, config, run, "after")[0]
    results["seconds"] = time.perf_counter() - start
    results["adapter"] = str(parts.learner.save_adapter(run / "sft" / "adapter"))
    (run / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"adapter {results['adapter']} (the next stage's lora.init_from); wrote {run / 'results.json'}")
    sync_run_files(run, run_location(config))
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rl.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.set)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
