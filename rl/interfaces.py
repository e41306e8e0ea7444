"""The interfaces the training loop is written against; ``actors/`` implements them.

Rollout engines

Two implementations: :class:`actors.rollout_hf.HFRolloutEngine` (transformers + PEFT, CPU or
GPU, our own decode loop) and :class:`actors.rollout_vllm.VLLMRolloutEngine` (vLLM, CPU or
GPU). Both are plain classes; ``ray.remote`` is applied where the engine group is built, and
tests/actors/test_engine_contract.py holds both to this contract.

The rollout engine's contract:

- ``generate(prompts, n, sampling)`` returns ``len(prompts) * n`` :class:`Completion` records,
  ordered by ``(prompt_index, sample_index)``, each stamped with the ``policy_version`` that
  produced it. ``logprobs`` are the sampler's: ``log_softmax(logits / T)`` of each sampled
  token in float32 (plain ``log_softmax(logits)`` when greedy), before any top-k / top-p
  renormalisation -- what the learner computes for the same tokens.
- ``update_adapter(version, tensors)`` replaces the LoRA weights; ``tensors`` is keyed as
  ``peft.get_peft_model_state_dict`` names them (``base_model.model.<module>.lora_A.weight``)
  and must cover every LoRA tensor. It applies atomically between generate calls: a generate
  sees either the old weights or the new ones, never a mix.
- optionally ``sync_from(learner)``: take the learner's current adapter over a transport of
  the engine's own (the Ray engine group: straight from the learner's process, gloo / NCCL /
  CUDA IPC / object store); :func:`sync_adapter` prefers it to ``update_adapter``.
- ``policy_version`` is the version of the weights now loaded (0 until the first update,
  unless an initial adapter says otherwise).

The learner's contract: ``train_step(groups)`` takes one optimizer step over the groups
and returns its stats (a dataclass of numbers); ``policy_version`` counts successful steps;
``export_adapter()`` returns the LoRA tensors under the same names the engine takes.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from rl.records import Completion, Prompt, SamplingParams, TrainGroup


@runtime_checkable
class RolloutEngine(Protocol):
    @property
    def policy_version(self) -> int: ...

    def generate(self, prompts: list[Prompt], n: int, sampling: SamplingParams) -> list[Completion]: ...

    def update_adapter(self, version: int, tensors: dict[str, Any]) -> None: ...


@runtime_checkable
class Learner(Protocol):
    @property
    def policy_version(self) -> int: ...

    def train_step(self, groups: list[TrainGroup]) -> Any: ...

    def export_adapter(self) -> dict[str, Any]: ...


def vllm_logprobs_mode(temperature: float, top_k: int = 0, top_p: float = 1.0) -> str:
    """The vLLM ``logprobs_mode`` whose numbers are this contract's for these sampling settings:
    ``processed_logprobs`` is ``log_softmax(logits / T)`` (plain ``log_softmax`` when greedy) but
    taken after top-k / top-p and renormalised, so with a filter only T = 1's ``raw_logprobs``
    is exact. Raises ValueError for a filter at any other temperature."""
    filtered = top_k > 0 or top_p < 1.0
    if not filtered or temperature == 0:
        return "processed_logprobs"
    if temperature == 1.0:
        return "raw_logprobs"
    raise ValueError(f"vLLM cannot report log_softmax(logits / T) with top-k/top-p at temperature "
                     f"{temperature:g} (its log-probs are after the filter); use temperature 1, or "
                     "top_k 0 and top_p 1, or the hf engine")


def sync_adapter(engine: RolloutEngine, learner: Learner):
    """Give the engine the learner's current adapter: the one way every caller does it. An
    engine with its own transport from the learner (``sync_from``, the Ray engine group) gets
    the tensors from the learner's process directly and returns the push's
    :class:`cluster.weight_sync.SyncStats`; any other engine takes them from
    ``learner.export_adapter()`` (None)."""
    if hasattr(engine, "sync_from"):
        return engine.sync_from(learner)
    engine.update_adapter(learner.policy_version, learner.export_adapter())
    return None
