"""The SFT stage: supervised steps on the GRPO learner before GRPO (the format warm-start).

A small model often cannot earn a first reward: if no completion of a group is right, GRPO has
no signal, and with a binary reward the easiest policy ("always CORRECT") is a trap. The format
warm-start teaches the answer format -- and, in the ``rewrite`` format, restating an expression
with standard operators and computing it -- on the training split's **standard-symbol items
only**: no custom symbol's meaning is ever shown.

Two sources of examples (``sft.items``):

* ``standard`` -- the standard-symbol items under the seed's prompt. The format is learned, but
  not how to read a custom symbol: after it the embedded model restates every custom symbol as
  the last few-shot line's ``*``, and GRPO, with no sample that tries another operator, rarely
  leaves that (results/recipe_t1_standard_sft: θ 3%, α 0% after 2,100 s).
* ``surrogate`` -- the same items under a prompt written with *surrogate* symbols (Greek letters
  other than θ α γ β) that a fresh random map per step gives random meanings; half of the
  questions use them. The meaning of a question's symbol is then only found in the prompt's
  own few-shot lines (or, for the fourth symbol, which they never show, by elimination), so
  the model learns to read them -- the skill the seed's prompt asks for -- without ever seeing
  one of θ α γ β with a meaning. What the seed's few-shot lines show it reads; what they do not
  (β), GRPO's reward has to teach.

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

import random
import time
from typing import Any, Callable, Iterator, Sequence

from rl.prompts import answer_text, uses_correct
from rl.records import TrainGroup, shared_head_len
from verifiers.symbols import OPS, SEED_SYMBOLS, SymbolMap, tokenize


def _target(question: str, api_answer, condition: str, answer_format: str, prefix: str,
            symbols: SymbolMap = SEED_SYMBOLS) -> str:
    text = answer_text(question, api_answer, use_correct=uses_correct(condition), answer_format=answer_format,
                       symbols=symbols)
    if not text.startswith(prefix):
        raise ValueError(f"the response prefix {prefix!r} does not begin the {answer_format!r} "
                         f"answer {text!r}; use a prefix the format starts with (or none)")
    return text[len(prefix):]


def _standard_items(items: Sequence) -> list:
    standard = [item for item in items if item.category == "standard"]
    if not standard:
        raise ValueError("the SFT warm-start needs standard-symbol items in the training data")
    return standard


def format_targets(items: Sequence, condition: str, answer_format: str) -> list[tuple[Any, str]]:
    """``(item, target text)`` for every standard-symbol item (a :class:`rl.loop.TrainItem`)."""
    return [(item, _target(item.example.question, item.example.api_answer, condition, answer_format,
                           item.prompt.response_prefix))
            for item in _standard_items(items)]


def _group(prompt_ids: list[int], target: str, tokenizer: Any) -> TrainGroup:
    ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    return TrainGroup(prompt_ids=prompt_ids, completions=[ids], advantages=[0.0], rollout_logprobs=[[]],
                      truncated=[False], policy_version=0, rewards=[1.0])


def sft_groups(pairs: Sequence[tuple[Any, str]], tokenizer: Any) -> list[TrainGroup]:
    """One single-completion :class:`TrainGroup` per example: the prompt's tokens and the
    target's, tokenized on its own (what the model generates after the prompt's last token)."""
    return [_group(item.prompt.token_ids, target, tokenizer) for item, target in pairs]


def standard_batches(groups: Sequence[TrainGroup], batch_size: int, seed: int) -> Iterator[list[TrainGroup]]:
    """Batches of ``batch_size`` examples drawn in seeded, reshuffled epochs."""
    from rl.loop import ItemStream

    stream = ItemStream(groups, seed)
    while True:
        yield [next(stream) for _ in range(batch_size)]


SURROGATE_SYMBOLS = "δεζηλμπσφψω"
"""Greek letters a surrogate map draws its four symbols from: none of the seed's θ α γ β."""
SURROGATE_SHARE = 0.5
"""The share of a surrogate batch's questions written with the batch's symbols (the rest keep
their standard operators, as the evaluation's standard items do)."""


def surrogate_map(rng: random.Random) -> SymbolMap:
    """Four distinct :data:`SURROGATE_SYMBOLS`, each given a random one of the four operations."""
    return SymbolMap.permuted("".join(rng.sample(SURROGATE_SYMBOLS, 4)), "".join(rng.sample(OPS, 4)))


def with_symbols(expression: str, symbols: SymbolMap) -> str:
    """A standard expression's operators written as ``symbols``' custom symbols."""
    return " ".join(str(t) if isinstance(t, int) else symbols.symbol_for(t) for t in tokenize(expression))


def surrogate_batches(items: Sequence, tokenizer: Any, condition: str, answer_format: str, batch_size: int,
                      seed: int) -> Iterator[list[TrainGroup]]:
    """Batches that teach reading a symbol's meaning off the prompt's examples.

    Each batch draws a fresh :func:`surrogate_map`; its examples are standard-symbol items
    (with their real API answers) whose prompt -- definitions and few-shot lines -- is written
    with that map, and :data:`SURROGATE_SHARE` of whose questions use its symbols. The answer
    is only found by looking the question's symbol up in the few-shot lines (or, for the
    fourth symbol, which they never show, by elimination), so the skill carries over to the
    seed's prompt, while none of θ α γ β is ever shown with a meaning. A batch shares its map,
    so :func:`merge_on_shared_head` still computes the few-shot head once."""
    from rl.loop import ItemStream
    from rl.prompts import adapter_prompt

    if condition == "B":
        raise ValueError("sft.items=surrogate needs a prompt that shows what the symbols mean (condition A, C "
                         "or D); condition B shows no symbol, so use sft.items=standard")
    stream, rng = ItemStream(_standard_items(items), seed), random.Random(f"{seed}:surrogate")
    while True:
        symbols, batch = surrogate_map(rng), []
        for _ in range(batch_size):
            item = next(stream)
            question, api, prefix = item.example.question, item.example.api_answer, item.prompt.response_prefix
            if rng.random() < SURROGATE_SHARE:
                question = with_symbols(question, symbols)
            prompt = adapter_prompt(tokenizer, question, api, condition, response_prefix=prefix,
                                    answer_format=answer_format, symbols=symbols)
            batch.append(_group(prompt.token_ids, _target(question, api, condition, answer_format, prefix, symbols),
                                tokenizer))
        yield batch


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


def run_sft(learner, batches: Iterator[list[TrainGroup]], steps: int, log: Callable[[int, dict], None],
            out_of_time: Callable[[], bool] = lambda: False, *, start_step: int = 0,
            evaluate: Callable[[int], dict] | None = None,
            on_step_end: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Steps ``start_step .. steps - 1`` (0-based), one batch each (fewer when ``out_of_time()``
    says so); returns each step's metrics (``sft/loss``, ``sft/entropy``, ``sft/tokens``,
    ``timing/sft``, plus ``evaluate(step)``'s ``eval/*`` when it returns any). ``on_step_end(step,
    metrics)`` runs after each step (checkpoints). A resumed stage passes ``start_step`` and a
    batch source positioned where the checkpoint left it."""
    history = []
    for step in range(start_step, steps):
        if out_of_time():
            break
        start = time.perf_counter()
        stats = learner.train_step(merge_on_shared_head(next(batches)), "sft")
        metrics = {"sft/loss": stats.loss, "sft/entropy": stats.entropy, "sft/tokens": stats.tokens,
                   "sft/lr": stats.lr, "sft/skipped": stats.skipped, "timing/sft": time.perf_counter() - start}
        if evaluate is not None:
            metrics.update(evaluate(step))
        log(step, metrics)
        history.append(metrics)
        if on_step_end is not None:
            on_step_end(step, metrics)
    return history


# --------------------------------------------------------------------------- rationale SFT


class RationaleError(ValueError):
    """A malformed rationale row; the message names the file, the line and the key."""


def read_rationale(path) -> list[tuple[str, str]]:
    """``(prompt, completion)`` of every row of a JSONL file (blank lines skipped). A row that is
    not a JSON object, or whose ``prompt`` or ``completion`` is missing, not a string or empty,
    raises :class:`RationaleError` naming ``file:line`` and the key."""
    import json
    from pathlib import Path

    rows = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise RationaleError(f"{path}:{number}: not JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise RationaleError(f"{path}:{number}: a row must be a JSON object, got {type(row).__name__}")
            for key in ("prompt", "completion"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise RationaleError(f"{path}:{number}: '{key}' must be a non-empty string, got {row.get(key)!r}")
            rows.append((row["prompt"], row["completion"]))
    if not rows:
        raise RationaleError(f"{path}: no rows")
    return rows


def rationale_groups(rows: Sequence[tuple[str, str]], tokenizer: Any) -> list[TrainGroup]:
    """One single-completion group per row: the prompt as raw text (:func:`rl.prompts.render_text`,
    the tokenizer's BOS, no chat template: what GSM8K rollouts and evaluation see), the completion
    tokenized on its own plus EOS, so that the model learns to stop after ``#### n``. Only the
    completion's tokens are trained (the learner's ``sft`` objective masks the prompt)."""
    from rl.prompts import render_text

    eos = getattr(tokenizer, "eos_token_id", None)
    groups = []
    for prompt, completion in rows:
        group = _group(render_text(tokenizer, prompt).token_ids, completion, tokenizer)
        if eos is not None:
            group.completions[0].append(eos)
        groups.append(group)
    return groups


class TokenBudgetBatches:
    """Batches of single-completion groups drawn in seeded, reshuffled epochs, each as many
    examples as fit in ``max_tokens`` prompt + completion tokens (at least one). ``position``
    counts the examples handed out; a batcher started at a position continues exactly where
    one that handed out that many would (what a checkpoint records)."""

    def __init__(self, groups: Sequence[TrainGroup], max_tokens: int, seed: int, position: int = 0):
        from rl.loop import ItemStream

        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} must be >= 1")
        self.max_tokens, self._stream, self._pending = max_tokens, ItemStream(groups, seed, position), None

    @property
    def position(self) -> int:
        return self._stream.position - (self._pending is not None)

    def __iter__(self) -> "TokenBudgetBatches":
        return self

    def __next__(self) -> list[TrainGroup]:
        batch, used = [], 0
        while True:
            group = self._pending if self._pending is not None else next(self._stream)
            size = len(group.prompt_ids) + len(group.completions[0])
            if batch and used + size > self.max_tokens:
                self._pending = group
                return batch
            self._pending = None
            batch.append(group)
            used += size
            if used >= self.max_tokens:
                return batch


class CountBatches(TokenBudgetBatches):
    """``batch_size`` examples per batch (seeded, reshuffled epochs), with a ``position``."""

    def __init__(self, groups: Sequence[TrainGroup], batch_size: int, seed: int, position: int = 0):
        super().__init__(groups, 1, seed, position)
        self.batch_size = batch_size

    def __next__(self) -> list[TrainGroup]:
        return [next(self._stream) for _ in range(self.batch_size)]


def eval_metrics(summary: dict) -> dict:
    """``eval/*`` metrics of an :func:`rl.evaluation.evaluate_items` summary: accuracy overall
    and per category; for GSM8K rows also the answer-boundary rates (raw completions)."""
    metrics = {f"eval/{name}": summary[name]["accuracy"] for name in ("overall", *summary.get("categories", ()))}
    raw = summary.get("boundary", {}).get("raw")
    if raw and raw["total"]:
        metrics.update({f"eval/{key}": raw[key] / raw["total"]
                        for key in ("exact", "strict_final_line", "trailing_text", "final_format")})
    return metrics
