"""The SFT stage: supervised steps on the GRPO learner before GRPO (the format warm-start).

A small model often cannot earn a first reward: if no completion of a group is right, GRPO has
no signal, and with a binary reward the easiest policy ("always CORRECT") is a trap. The format
warm-start teaches the answer format -- and, in the ``rewrite`` format, restating an expression
with standard operators and computing it -- on the training split's **standard-symbol items
only**: no custom symbol's meaning is ever shown, so what GRPO then learns about θ, α, γ and β
comes from the reward alone.

Targets are :func:`rl.prompts.answer_text`, the reply the condition's few-shot lines model
(CORRECT when the API's answer is right and the condition offers it), minus the prompt's
response prefix; they end with the box's ``}``, where the rollout's stop string ends a
completion. A step is one :meth:`Learner.train_step` with ``objective="sft"`` (mean token NLL of
the targets) over ``batch_size`` examples drawn in seeded, reshuffled epochs and merged on the
prompt head they share (:func:`merge_on_shared_head`: ~5x fewer tokens through the model on the
adapter prompt); the learning rate is ``sft.lr``, constant, before GRPO's schedule starts
(actors/learner.py).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from rl.prompts import answer_text, uses_correct
from rl.records import TrainGroup, shared_head_len


def format_targets(items: Sequence, condition: str, answer_format: str) -> list[tuple[Any, str]]:
    """``(item, target text)`` for every standard-symbol item (a :class:`rl.loop.TrainItem`)."""
    pairs = []
    for item in items:
        if item.category != "standard":
            continue
        text = answer_text(item.example.question, item.example.api_answer,
                           use_correct=uses_correct(condition), answer_format=answer_format)
        prefix = item.prompt.response_prefix
        if not text.startswith(prefix):
            raise ValueError(f"the response prefix {prefix!r} does not begin the {answer_format!r} "
                             f"answer {text!r}; use a prefix the format starts with (or none)")
        pairs.append((item, text[len(prefix):]))
    if not pairs:
        raise ValueError("the SFT warm-start needs standard-symbol items in the training data")
    return pairs


def sft_groups(pairs: Sequence[tuple[Any, str]], tokenizer: Any) -> list[TrainGroup]:
    """One single-completion :class:`TrainGroup` per example: the prompt's tokens and the
    target's, tokenized on its own (what the model generates after the prompt's last token)."""
    groups = []
    for item, target in pairs:
        ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
        groups.append(TrainGroup(prompt_ids=item.prompt.token_ids, completions=[ids], advantages=[0.0],
                                 rollout_logprobs=[[]], truncated=[False], policy_version=0, rewards=[1.0]))
    return groups


def merge_on_shared_head(groups: Sequence[TrainGroup]) -> list[TrainGroup]:
    """Single-completion groups as one group whose prompt is the head all their prompts share
    (the system message and few-shot lines, ~200 of the adapter prompt's ~230 tokens); each
    prompt's own tail leads its completion as context (not trained on). The learner then
    computes the head once for the batch instead of once per example. Prompts that share no
    token stay as they are."""
    prompts = [g.prompt_ids for g in groups]
    head = shared_head_len(prompts)
    if head == 0:
        return list(groups)
    return [TrainGroup(prompt_ids=prompts[0][:head],
                      completions=[g.prompt_ids[head:] + g.completions[0] for g in groups],
                      advantages=[0.0] * len(groups), rollout_logprobs=[[] for _ in groups],
                      truncated=[False] * len(groups), policy_version=0, rewards=[1.0] * len(groups),
                      context=[len(g.prompt_ids) - head for g in groups])]


def run_sft(learner, groups: Sequence[TrainGroup], steps: int, batch_size: int, seed: int,
            log: Callable[[int, dict], None], out_of_time: Callable[[], bool] = lambda: False) -> list[dict]:
    """``steps`` SFT steps of ``batch_size`` examples (fewer when ``out_of_time()`` says so);
    returns each step's metrics (``sft/loss``, ``sft/entropy``, ``sft/tokens``, ``timing/sft``)."""
    from rl.loop import ItemStream

    stream = ItemStream(groups, seed)
    history = []
    for step in range(steps):
        if out_of_time():
            break
        start = time.perf_counter()
        stats = learner.train_step(merge_on_shared_head([next(stream) for _ in range(batch_size)]), "sft")
        metrics = {"sft/loss": stats.loss, "sft/entropy": stats.entropy, "sft/tokens": stats.tokens,
                   "sft/lr": stats.lr, "sft/skipped": stats.skipped, "timing/sft": time.perf_counter() - start}
        log(step, metrics)
        history.append(metrics)
    return history
