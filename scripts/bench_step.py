"""Time one GRPO learner step: shared-prefix vs plain compute (and TRL's GRPOTrainer).

    python -m scripts.bench_step                    # embedded SmolLM2-135M, G=8, P~165, C=5
    python -m scripts.bench_step --threads 1 --trl  # also TRL, everything on one thread
    python -m scripts.bench_step --groups 2 --steps 3 --model /path/to/model --device cuda

Each variant builds a fresh :class:`actors.learner.Learner` (LoRA r16 on all projections, as the
default config), runs one untimed warm-up step, then ``--steps`` timed steps (the two variants
interleaved, so a busy machine slows both alike) on the same hand-made groups: a chat prompt of
about ``--prompt-tokens`` tokens, G random completions of ``--completion-tokens`` tokens,
advantages +-1. Prints the median seconds per step; nothing is asserted. ``--trl`` also runs
TRL's GRPOTrainer (LoRA r16, HF generation on CPU, beta 0, loss "dapo", no gradient
checkpointing) on the same prompt length and sizes and prints its step time minus its
generation time, i.e. its forward, backward and optimizer step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Sequence


def prompt_messages(tokenizer, prompt_tokens: int, salt: int = 0) -> list[dict]:
    """A chat prompt of about prompt_tokens tokens once rendered with the generation prompt."""
    lines: list[str] = []
    while True:
        a = len(lines)
        lines.append(f"{a} θ {a + salt} γ {a % 7} = ?")
        messages = [{"role": "user", "content": " ".join(lines)}]
        if len(_render(tokenizer, messages)) >= prompt_tokens:
            return messages


def _render(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def make_groups(tokenizer, n_groups: int, group_size: int, prompt_tokens: int,
                completion_tokens: int, seed: int = 0):
    import torch

    from rl.records import TrainGroup

    gen = torch.Generator().manual_seed(seed)
    groups = []
    for g in range(n_groups):
        ids = _render(tokenizer, prompt_messages(tokenizer, prompt_tokens, salt=g))
        completions = torch.randint(10, tokenizer.vocab_size - 10,
                                    (group_size, completion_tokens), generator=gen).tolist()
        advantages = [1.0 if i % 2 == 0 else -1.0 for i in range(group_size)]
        groups.append(TrainGroup(prompt_ids=ids, completions=completions, advantages=advantages,
                                 rollout_logprobs=[[-2.0] * completion_tokens] * group_size,
                                 truncated=[False] * group_size, policy_version=0))
    return groups


def time_learners(model: str, groups, steps: int, device: str) -> dict[str, list[float]]:
    """Both variants built first, then their steps interleaved, so that a busy machine slows
    both alike; one untimed warm-up step each."""
    from actors.learner import Learner

    learners = {name: Learner(model, lr=1e-5, total_steps=100, shared_prefix=shared,
                              device=device)
                for name, shared in (("shared-prefix", True), ("plain", False))}
    out: dict[str, list[float]] = {name: [] for name in learners}
    for step in range(steps + 1):
        for name, learner in learners.items():
            seconds = learner.train_step(groups).seconds
            if step:
                out[name].append(seconds)
    return out


def time_trl(model: str, tokenizer, n_groups: int, group_size: int, prompt_tokens: int,
             completion_tokens: int, steps: int) -> dict[str, list[float]]:
    """TRL's GRPOTrainer on the same model, LoRA, prompt length and sizes (HF generation,
    beta 0, one optimizer step per generation batch). Returns per-step seconds of the whole
    step and of its generation (TRL generates inside the step); warm-up step dropped."""
    import tempfile

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from actors.learner import ALL_LINEAR
    from actors.models import resolve_model_path

    generation: list[float] = []
    whole: list[float] = []

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            generation.append(time.perf_counter() - t0)
            return out

    class StepTimer(TrainerCallback):
        t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            StepTimer.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            whole.append(time.perf_counter() - StepTimer.t0)

    def reward(completions, **kwargs):  # half right, half wrong: every group informative
        return [float(i % 2) for i in range(len(completions))]

    rows = [{"prompt": prompt_messages(tokenizer, prompt_tokens, salt=g)} for g in range(n_groups)]
    with tempfile.TemporaryDirectory() as out_dir:
        config = GRPOConfig(
            output_dir=out_dir, per_device_train_batch_size=n_groups * group_size,
            num_generations=group_size, max_completion_length=completion_tokens,
            generation_kwargs={"min_new_tokens": completion_tokens}, learning_rate=1e-5,
            beta=0.0, loss_type="dapo", max_steps=steps + 1, logging_steps=1,
            save_strategy="no", report_to=[], use_cpu=True, bf16=False, shuffle_dataset=False,
            gradient_checkpointing=False)  # TRL turns it on by default; the learner's is off
        trainer = TimedGRPOTrainer(
            model=str(resolve_model_path(model)), reward_funcs=reward, args=config,
            train_dataset=Dataset.from_list(rows * (steps + 1)), processing_class=tokenizer,
            peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=list(ALL_LINEAR),
                                   task_type="CAUSAL_LM"),
            callbacks=[StepTimer()])
        trainer.train()
    return {"step": whole[1:], "generation": generation[1:]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=165)
    parser.add_argument("--completion-tokens", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--trl", action="store_true",
                        help="also time TRL's GRPOTrainer (pip install trl; CPU only here)")
    args = parser.parse_args(argv)
    if args.threads:  # accelerate (under TRL) resets torch's threads from OMP_NUM_THREADS
        os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import torch

    from actors.models import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    groups = make_groups(tokenizer, args.groups, args.group_size, args.prompt_tokens,
                         args.completion_tokens)
    print(f"model={args.model} device={args.device} groups={args.groups} G={args.group_size} "
          f"prompt={len(groups[0].prompt_ids)} completion={args.completion_tokens} "
          f"threads={torch.get_num_threads()}", flush=True)
    results = {}
    for name, secs in time_learners(args.model, groups, args.steps, args.device).items():
        results[name] = statistics.median(secs)
        print(f"{name:>14}: {results[name]:.3f} s/step median (steps "
              f"{', '.join(f'{s:.3f}' for s in secs)})", flush=True)
    print(f"plain / shared-prefix: {results['plain'] / results['shared-prefix']:.2f}x")
    if args.trl:
        trl = time_trl(args.model, tokenizer, args.groups, args.group_size, args.prompt_tokens,
                       args.completion_tokens, args.steps)
        steps = [s - g for s, g in zip(trl["step"], trl["generation"])]
        print(f"{'TRL GRPO':>14}: {statistics.median(steps):.3f} s/step median without generation "
              f"(whole steps {', '.join(f'{s:.3f}' for s in trl['step'])}; generation "
              f"{', '.join(f'{g:.3f}' for g in trl['generation'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
