"""Time one whole GRPO step, ours against TRL's GRPOTrainer, on the adapter task.

    python -m scripts.bench_grpo_step                       # embedded SmolLM2-135M, 3 timed steps
    python -m scripts.bench_grpo_step --steps 2 --rounds 2 --threads 1 --max-new-tokens 8
    python -m scripts.bench_grpo_step --ours-only --model /path/to/model --steps 1

One step is everything between two optimizer updates: generation of ``--prompts`` x
``--group-size`` completions, the binary reward, the advantages, one optimizer step of the
LoRA (and, for ours, the weight sync from the learner to the rollout engine).

Both sides get the same work:

* the base model folder, LoRA rank / alpha on all seven projections, lr, weight decay, linear
  schedule without warm-up, gradient clipping 1.0, clip range 0.2, KL coefficient ``--beta``;
* the same prompts in the same order: condition-D adapter prompts (rl/prompts.py) for tier-t1
  symbol expressions, the "upstream" answer given by a fixed rule (the truth for even rows,
  truth + 1 for odd ones: no upstream call), rendered through the chat template and ending
  with the response prefix ``\\boxed{``. TRL gets that text as a raw-string prompt, so it
  tokenizes to the same ids and continues inside the box;
* the same group size, max new tokens (no stop strings; EOS ends a completion), temperature,
  top-k / top-p off, and the reward (verifiers.rewards "binary" on prefix + completion);
* float32 on the CPU, ``--threads`` torch threads, no gradient checkpointing (TRL turns it on
  by default; it is turned off here to match our learner).

Ours is rl.loop.train_step over HFRolloutEngine + Learner with zero-variance filtering OFF by
default, so it samples exactly one batch per step and trains on all of it, as TRL does
(``--filter-zero-variance`` restores the training default, which may refill and sample more).
TRL runs one optimizer step per generation batch (per_device_train_batch_size = prompts x
group size, no accumulation), loss "dapo" (token mean, as our ``token_mean``); its step time
is taken by a TrainerCallback (on_step_begin -> on_step_end), its generation time as the time
from the step's start until our reward function is called.

Differences that stay, since they are how each side works: ours prefills each prompt once
for its group (sampling and learning), TRL once per completion; on a CPU (no Triton) TRL's
fused LM head scores every position, prompt included; ours keeps two copies of the base model
(rollout engine and learner) where TRL shares one, and pays for the weight sync.

Each side runs in its own subprocess (so ``ru_maxrss`` is that side's peak memory): one
untimed warm-up step, then ``--steps`` timed steps; ``--rounds R`` runs each side R times in
the order ours, TRL, TRL, ours, ... and pools the timed steps, so that a machine whose load
drifts (a shared one) weighs on both sides alike. Each side prints one line per step. The
table gives seconds per step (median, mean), generation seconds per step, peak RSS and ours /
TRL. ``--out`` gets the JSON with all settings, per-step times, the machine (CPUs, load
average before and after each side) and the versions of torch / transformers / peft / trl.
Nothing is asserted.

Measured (2 cores, shared, torch 2.13 / TRL 1.16, defaults, ``--rounds 2``): ours ~11 s per
step, TRL ~81 s in its quieter round (66 s has been seen); peak RSS ~5 GiB vs ~20 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: this checkout first

from scripts.bench_results import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SIDES = ("ours", "trl")


def knob(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    """What both sides run; every field is a flag of the same name (``--max-new-tokens``)."""

    model: str = knob("embedded", "base model: 'embedded' or a local model folder")
    steps: int = knob(3, "timed steps per side, after one untimed warm-up step")
    prompts: int = knob(4, "prompts per step")
    group_size: int = knob(8, "completions per prompt (TRL's num_generations)")
    max_new_tokens: int = knob(5, "completion length cap (TRL's max_completion_length)")
    temperature: float = knob(1.0, "sampling temperature (top-k and top-p are off)")
    beta: float = knob(0.0, "KL coefficient against the adapter-free model")
    lr: float = knob(1e-5, "peak learning rate (linear decay, no warm-up)")
    weight_decay: float = knob(0.001, "AdamW weight decay (our learner's default)")
    lora_rank: int = knob(16, "LoRA rank on all seven projections")
    lora_alpha: float = knob(32.0, "LoRA alpha")
    response_prefix: str = knob("\\boxed{", "assistant prefill the completion continues")
    condition: str = knob("D", "adapter prompt condition (rl/prompts.py)")
    threads: int = knob(2, "torch / OpenMP threads on both sides")
    seed: int = knob(0, "seed of the data, the LoRA init and sampling")
    filter_zero_variance: bool = knob(False, "ours only: drop zero-variance groups and refill "
                                             "(the training default; more sampling per step)")


# ------------------------------------------------------------------------------ the task


def task_rows(n: int, seed: int) -> list[dict]:
    """``n`` tier-t1 symbol rows ``{expression, truth, api}``; the api answer is the truth on
    even rows and truth + 1 on odd ones (half the groups should answer CORRECT)."""
    from verifiers.symbol_data import LADDER, build_symbol_dataset

    tier = {t.name: t for t in LADDER}["t1"]
    train, _ = build_symbol_dataset(n_per_type=n, seed=seed, test_fraction=0.2, tier=tier)
    rows = train[:n]
    return [{"expression": r["expression"], "truth": r["answer"],
             "api": r["answer"] if i % 2 == 0 else r["answer"] + 1} for i, r in enumerate(rows)]


def render_prompts(tokenizer, rows: list[dict], s: Settings) -> list:
    """Each row's adapter prompt (rl.records.Prompt: text and ids, ending with the prefix)."""
    from rl.prompts import adapter_prompt

    return [adapter_prompt(tokenizer, r["expression"], r["api"], s.condition,
                           response_prefix=s.response_prefix) for r in rows]


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def progress(side: str, step: int, record: dict) -> None:
    """One line per step on stderr, so a long run can be watched."""
    print(f"[{side}] step {step} ({'warm-up' if step == 0 else 'timed'}): "
          f"{record['seconds']:.2f} s, generation {record['generation_seconds']:.2f} s, "
          f"reward {record.get('reward_mean', float('nan')):.3f}, load {os.getloadavg()[0]:.1f}",
          file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------------------ our side


def run_ours(s: Settings) -> dict:
    """rl.loop.train_step, steps + 1 times (the first untimed), on one fixed item stream."""
    import torch

    from actors.learner import Learner
    from actors.rollout_hf import HFRolloutEngine
    from rl.interfaces import sync_adapter
    from rl.loop import ItemStream, LoopSettings, TrainItem, train_step
    from rl.records import SamplingParams
    from verifiers.rewards import Example, get_reward

    set_threads(s.threads)
    torch.manual_seed(s.seed)
    lora = dict(lora_rank=s.lora_rank, lora_alpha=s.lora_alpha, target_modules=TARGETS)
    learner = Learner(s.model, **lora, lr=s.lr, weight_decay=s.weight_decay, warmup_steps=0,
                      total_steps=s.steps + 1, lr_schedule="linear", kl_coef=s.beta,
                      temperature=s.temperature, constant_normaliser=s.max_new_tokens,
                      seed=s.seed)
    engine = HFRolloutEngine(s.model, **lora, seed=s.seed)
    sync_adapter(engine, learner)
    rows = task_rows(_rows_needed(s), s.seed)
    items = [TrainItem(f"row{i}", p, Example(truth=r["truth"], api_answer=r["api"],
                                             question=r["expression"]), "custom")
             for i, (r, p) in enumerate(zip(rows, render_prompts(engine.tokenizer, rows, s)))]
    reward = get_reward("binary")
    settings = LoopSettings(
        steps=s.steps + 1, prompts_per_step=s.prompts, group_size=s.group_size,
        sampling=SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature),
        filter_zero_variance=s.filter_zero_variance,
        max_refill_rounds=2 if s.filter_zero_variance else 0, seed=s.seed)
    stream = ItemStream(items, s.seed, shuffle=False)  # the rows in order, as TRL's side takes them
    steps = []
    for step in range(s.steps + 1):
        t0 = time.perf_counter()
        metrics = train_step(step, stream, engine, learner,
                             lambda pairs: [reward(t, e) for t, e in pairs], settings)
        steps.append({"seconds": time.perf_counter() - t0,
                      "generation_seconds": metrics.get("timing/rollout", 0.0),
                      "reward_mean": metrics["reward/mean"],
                      "phases": {k[len("timing/"):]: v for k, v in metrics.items()
                                 if k.startswith("timing/")}})
        progress("ours", step, steps[-1])
    return {"steps": steps, "policy_version": learner.policy_version,
            "prompt_tokens": [len(i.prompt.token_ids) for i in items[: s.prompts]],
            "threads": torch.get_num_threads(), "peak_rss_mib": peak_rss_mib()}


def _rows_needed(s: Settings) -> int:
    # with filtering on, refills may take up to two extra rounds of prompts per step
    return s.prompts * (s.steps + 1) * (3 if s.filter_zero_variance else 1)


# ------------------------------------------------------------------------------ TRL's side


def run_trl(s: Settings) -> dict:
    """TRL's GRPOTrainer on the same model, LoRA, prompts and sampling; times per optimizer step
    from a TrainerCallback, generation until the reward function is called."""
    from fractions import Fraction

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from actors.models import load_tokenizer, resolve_model_path
    from verifiers.rewards import Example, get_reward

    set_threads(s.threads)
    tokenizer = load_tokenizer(s.model)
    rows = task_rows(_rows_needed(s), s.seed)
    prompts = render_prompts(tokenizer, rows, s)
    dataset = Dataset.from_list([{"prompt": p.text, "truth": str(r["truth"]), "api": str(r["api"])}
                                 for r, p in zip(rows, prompts)])
    binary = get_reward("binary")
    steps: list[dict] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            steps.append({"start": time.perf_counter()})

        def on_step_end(self, args, state, control, **kwargs):
            steps[-1]["seconds"] = time.perf_counter() - steps[-1]["start"]
            progress("trl", len(steps) - 1, steps[-1])

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "step_time" in logs:  # TRL's own timing, kept as a cross-check
                steps[-1]["trl_logged_step_time"] = float(logs["step_time"])

    def adapter_binary(prompts, completions, truth, api, **kwargs):
        """Our binary reward on prefix + completion (TRL passes the dataset's columns)."""
        if "generation_seconds" not in steps[-1]:
            steps[-1]["generation_seconds"] = time.perf_counter() - steps[-1]["start"]
        out = [binary(s.response_prefix + c, Example(truth=Fraction(t), api_answer=Fraction(a))).reward
               for c, t, a in zip(completions, truth, api)]
        steps[-1]["reward_mean"] = sum(out) / len(out)
        return out

    with tempfile.TemporaryDirectory() as out_dir:
        config = GRPOConfig(
            output_dir=out_dir, max_steps=s.steps + 1, per_device_train_batch_size=s.prompts * s.group_size,
            gradient_accumulation_steps=1, num_generations=s.group_size,
            max_completion_length=s.max_new_tokens, temperature=s.temperature, top_p=1.0, top_k=0,
            learning_rate=s.lr, weight_decay=s.weight_decay, lr_scheduler_type="linear", warmup_steps=0,
            max_grad_norm=1.0, beta=s.beta, epsilon=0.2, loss_type="dapo", scale_rewards="group",
            num_iterations=1, shuffle_dataset=False, seed=s.seed, use_cpu=True, bf16=False,
            model_init_kwargs={"dtype": "float32"},
            gradient_checkpointing=False,  # TRL's default is True; our learner's is off
            logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0,
            disable_tqdm=True)
        trainer = GRPOTrainer(
            model=str(resolve_model_path(s.model)), reward_funcs=adapter_binary, args=config,
            train_dataset=dataset, processing_class=tokenizer,
            peft_config=LoraConfig(r=s.lora_rank, lora_alpha=s.lora_alpha, lora_dropout=0.0,
                                   target_modules=list(TARGETS), task_type="CAUSAL_LM"),
            callbacks=[StepTimes()])
        set_threads(s.threads)  # accelerate may have reset the thread count
        trainer.train()
    if len(steps) != s.steps + 1 or any("generation_seconds" not in st for st in steps):
        raise RuntimeError(f"TRL ran {len(steps)} timed steps with the reward called in "
                           f"{sum('generation_seconds' in st for st in steps)}; expected "
                           f"{s.steps + 1} of each (did GRPOTrainer's step change?)")
    for st in steps:
        st.pop("start")
    # TRL tokenizes a raw-string prompt as processing_class(text=prompts): the same ids as ours?
    trl_ids = tokenizer(text=[p.text for p in prompts])["input_ids"]
    return {"steps": steps, "prompt_tokens": [len(p.token_ids) for p in prompts[: s.prompts]],
            "prompt_ids_match": all(list(a) == p.token_ids for a, p in zip(trl_ids, prompts)),
            "threads": torch.get_num_threads(), "peak_rss_mib": peak_rss_mib()}


# ------------------------------------------------------------------------------ the parent


def side_argv(s: Settings, side: str, result: Path) -> list[str]:
    """The command line that runs one side of ``s`` in a fresh interpreter."""
    argv = [sys.executable, "-m", "scripts.bench_grpo_step", "--side", side, "--result", str(result)]
    for f in fields(Settings):
        value, flag = getattr(s, f.name), "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


def run_side(s: Settings, side: str) -> dict:
    """One side in a subprocess with ``s.threads`` OpenMP threads; its result plus the load
    average before and after."""
    env = dict(os.environ, OMP_NUM_THREADS=str(s.threads), MKL_NUM_THREADS=str(s.threads),
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        subprocess.run(side_argv(s, side, result), cwd=ROOT, env=env, check=True)
        out = json.loads(result.read_text())
    out.update(load_before=load_before, load_after=os.getloadavg(),
               wall_seconds=time.perf_counter() - t0)
    return out


def run_rounds(s: Settings, sides: Sequence[str], rounds: int) -> dict[str, list[dict]]:
    """Every side once per round, the order reversed every other round (ABBA), so that a load
    that drifts during the run weighs on both sides alike."""
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for r in range(rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            runs[side].append(run_side(s, side))
    return runs


def summarise(runs: list[dict]) -> dict:
    """Timed steps pooled over the rounds (each round's warm-up step left out)."""
    timed = [st for run in runs for st in run["steps"][1:]]
    secs = [st["seconds"] for st in timed]
    gen = [st["generation_seconds"] for st in timed]
    return {"median_s": statistics.median(secs), "mean_s": statistics.fmean(secs),
            "generation_median_s": statistics.median(gen),
            "peak_rss_mib": max(run["peak_rss_mib"] for run in runs)}


def format_table(summary: dict[str, dict]) -> str:
    cols = ("median_s", "mean_s", "generation_median_s", "peak_rss_mib")
    head = f"{'':>12} {'s/step med':>11} {'s/step mean':>12} {'gen s med':>10} {'peak RSS MiB':>13}"
    lines = [head]
    for name, row in summary.items():
        lines.append(f"{name:>12} " + " ".join(f"{row[c]:>{w}.{p}f}" for c, w, p in
                                               zip(cols, (11, 12, 10, 13), (2, 2, 2, 0))))
    return "\n".join(lines)


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "peft", "trl", "deepspeed", "accelerate"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_grpo_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        help = f"{f.metadata['help']} (default: %(default)s)"
        if f.type == "bool":  # annotations are strings here (from __future__ import annotations)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            parser.add_argument(flag, type=kind, default=f.default, help=help)
    parser.add_argument("--ours-only", action="store_true", help="skip TRL (no ratio)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run each side this many times, order reversed every other round "
                             "(ours, TRL, TRL, ours, ...); timed steps are pooled (default: 1)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_grpo_step.json"),
                        help="where the JSON report goes (default: %(default)s)")
    parser.add_argument("--side", choices=SIDES, help="internal: run one side in this process")
    parser.add_argument("--result", type=Path, help="internal: where --side writes its JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    s = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    if s.steps < 1 or s.prompts < 1 or s.group_size < 2 or s.max_new_tokens < 1 or s.threads < 1 \
            or args.rounds < 1:
        raise SystemExit("need --steps >= 1, --prompts >= 1, --group-size >= 2, "
                         "--max-new-tokens >= 1, --threads >= 1 and --rounds >= 1")
    if args.side:
        out = run_ours(s) if args.side == "ours" else run_trl(s)
        args.result.write_text(json.dumps(out))
        return 0

    sides = ("ours",) if args.ours_only else SIDES
    load_before = os.getloadavg()
    print(f"model={s.model} prompts={s.prompts} G={s.group_size} max_new_tokens={s.max_new_tokens} "
          f"threads={s.threads} steps={s.steps} (+1 warm-up) x {args.rounds} rounds cpus={os.cpu_count()} "
          f"load={load_before}", flush=True)
    results = run_rounds(s, sides, args.rounds)
    summary = {side: summarise(r) for side, r in results.items()}
    ratio = None
    if "trl" in summary:
        ratio = {k: summary["ours"][k] / summary["trl"][k] for k in summary["ours"]}
    print(format_table(summary))
    if ratio:
        print(f"ours / TRL: {ratio['median_s']:.3f}x s/step (median), {ratio['mean_s']:.3f}x "
              f"(mean), {ratio['peak_rss_mib']:.2f}x peak RSS; target <= 0.5x")
    report = {"settings": asdict(s), "rounds": args.rounds, "summary": summary, "ratio_ours_over_trl": ratio,
              "sides": results, "versions": versions(),
              "machine": {"cpus": os.cpu_count(), "load_before": load_before,
                          "load_after": os.getloadavg()}}
    write_result(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
