"""Typed records that cross process boundaries (driver ↔ rollout, verifier, learner actors).

Token sequences are plain ``list[int]`` (cheap to pickle, no torch needed by ``rl``);
per-token values are ``list[float]`` of the same length as the tokens they describe.
Every rollout carries the ``policy_version`` of the adapter that sampled it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature 0 means greedy; top_k 0 means off; stop strings end a
    completion after the string (the string is kept in the text and tokens)."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Prompt:
    """One prompt, already rendered through the chat template.

    token_ids: [P] the prompt's tokens, ending with the response prefix's tokens if any;
    text: the same as a string; response_prefix: the assistant prefill the completion
    continues (``""`` when none), which rewards judge together with the completion.
    """

    token_ids: list[int]
    text: str
    response_prefix: str = ""


@dataclass(frozen=True)
class Completion:
    """One sampled continuation of a prompt.

    prompt_index: index into the request's prompt list; sample_index: 0..n-1 within the group;
    token_ids: [C] generated tokens (EOS included when the model emitted it);
    logprobs: [C] the sampler's log-probabilities of those tokens (after temperature);
    text: decoded ``token_ids`` without special tokens; finish_reason: ``stop`` (EOS or a stop
    string) or ``length`` (hit max_new_tokens: truncated); policy_version: the adapter version.
    """

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: FinishReason
    policy_version: int


@dataclass(frozen=True)
class TrainGroup:
    """One prompt and its G scored completions, as the learner consumes them.

    prompt_ids: [P]; completions: G token lists [C_i]; advantages: [G];
    rollout_logprobs: G lists [C_i] from the sampler (for truncated importance sampling);
    truncated: [G] whether each completion hit the length limit; context: [G] or empty, how
    many leading tokens of each completion are context, fed to the model but not trained on
    (the rest of a prompt whose head several prompts share: they then form one group whose
    prompt is the head).
    """

    prompt_ids: list[int]
    completions: list[list[int]]
    advantages: list[float]
    rollout_logprobs: list[list[float]]
    truncated: list[bool]
    policy_version: int
    rewards: list[float] = field(default_factory=list)
    context: list[int] = field(default_factory=list)


def shared_head_len(prompts: list[list[int]]) -> int:
    """Tokens all prompts start with, leaving each at least one of its own (whose logits start
    its completion)."""
    limit = min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n
