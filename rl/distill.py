"""Boundary self-distillation: fine-tune the model on its own clean, correct GSM8K samples.

The answer-boundary lab's promoted 3B recipe (``../shared/seed-experiment.md``). One round:

1. ``sample`` -- the rollout engine (the current adapter, the rollout's sampling knobs) writes
   ``sft.distill_samples`` completions of each training question, under the strict final-line
   prompt (:func:`rl.prompts.gsm8k_prompt`, raw text);
2. ``filter`` -- :func:`keep_sample` keeps exactly the completions that are exact-correct, whose
   last non-empty line is ``#### <answer>`` and that have nothing after the marker (all three read
   by :func:`verifiers.answers.score_gsm8k`); :func:`dedupe` drops repeated (question, text)
   pairs;
3. ``learn`` -- the kept samples are SFT targets (rl/sft.py, loss on completion tokens only,
   batched by the token budget) for ``sft.distill_steps`` steps.

Before the first round and after the last, the held-out questions are answered greedily; the
paired bootstrap (:func:`rl.bootstrap.paired_bootstrap`, after − before) goes to
``RUN/distill_report.json`` with one readable line. The lab saw it help a 3B model and hurt a
7B one: a regression is a negative interval in that line, never dropped or averaged away.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from verifiers.answers import score_gsm8k


def keep_sample(completion: str, truth) -> bool:
    """Whether a sampled completion is a self-distillation target: exact-correct, the last
    non-empty line is ``#### <answer>``, and no text follows the marker.

    >>> keep_sample("2 + 3 = 5\\n#### 5", 5), keep_sample("#### 5\\nso five", 5)
    (True, False)
    >>> keep_sample("The answer is \\\\boxed{5}", 5), keep_sample("2 + 2 = 4\\n#### 4", 5)
    (False, False)
    """
    score = score_gsm8k(completion, truth)
    return score.exact and score.strict_final_line and not score.trailing_text


def dedupe(pairs: Sequence[tuple[Any, str]]) -> list[tuple[Any, str]]:
    """``(item, text)`` pairs without repeats of the same item uid and whitespace-stripped text,
    first occurrence kept (several samples of a question are often identical)."""
    seen, out = set(), []
    for item, text in pairs:
        key = (item.uid, text.strip())
        if key not in seen:
            seen.add(key)
            out.append((item, text))
    return out


@dataclass(frozen=True)
class RoundStats:
    """One round's sampling: questions, samples drawn, kept by :func:`keep_sample`, unique."""

    round: int
    questions: int
    samples: int
    kept: int
    unique: int


def sample_targets(engine, items: Sequence, sampling, n_samples: int, round_index: int = 0
                   ) -> tuple[list[tuple[Any, str]], RoundStats]:
    """Sample ``n_samples`` completions of each item (``rl.loop.TrainItem``, GSM8K) and keep the
    allowed ones, deduplicated: ``([(item, completion text)], stats)``."""
    completions = engine.generate([item.prompt for item in items], n_samples, sampling)
    kept = [(items[c.prompt_index], c.text) for c in completions
            if keep_sample(items[c.prompt_index].prompt.response_prefix + c.text, items[c.prompt_index].example.truth)]
    unique = dedupe(kept)
    return unique, RoundStats(round_index, len(items), len(completions), len(kept), len(unique))


def effect_report(before_rows: Sequence, after_rows: Sequence, iterations: int = 10_000, seed: int = 0) -> dict:
    """The paired bootstrap of held-out exactness, after − before (rows: ``rl.evaluation.EvalRow``,
    one per question), as a JSON-ready dict with a readable ``line``."""
    from rl.bootstrap import paired_bootstrap

    result = paired_bootstrap({r.uid: r.correct for r in before_rows}, {r.uid: r.correct for r in after_rows},
                              iterations, seed)
    verdict = ("helped" if result.ci_low > 0 else "hurt" if result.ci_high < 0
               else "no clear effect (the interval contains 0)")
    line = (f"self-distillation: exact {result.a_correct}/{result.n_paired} -> {result.b_correct}/{result.n_paired}, "
            f"delta {result.sum_delta:+d} ({result.wins} wins, {result.losses} losses), 95% interval "
            f"[{result.ci_low_count:+.1f}, {result.ci_high_count:+.1f}] examples: {verdict}")
    return {**asdict(result), "verdict": verdict, "line": line}


def write_report(run: Path, report: dict, rounds: Sequence[RoundStats]) -> Path:
    """``RUN/distill_report.json``: the bootstrap, its line, and each round's sampling counts."""
    path = Path(run) / "distill_report.json"
    path.write_text(json.dumps({**report, "rounds": [asdict(r) for r in rounds]}, indent=2) + "\n")
    return path
