"""The rollout engines by their config name (``rollout.engine``), built in the calling process."""

from __future__ import annotations

from typing import Any

ENGINES = ("hf", "vllm")


def build_engine(kind: str, kwargs: dict) -> Any:
    """An ``hf`` (:class:`actors.rollout_hf.HFRolloutEngine`) or ``vllm``
    (:class:`actors.rollout_vllm.VLLMRolloutEngine`) engine; never one for the other."""
    if kind == "hf":
        from actors.rollout_hf import HFRolloutEngine

        return HFRolloutEngine(**kwargs)
    if kind == "vllm":
        from actors.rollout_vllm import VLLMRolloutEngine

        return VLLMRolloutEngine(**kwargs)
    raise ValueError(f"rollout engine {kind!r}: one of {', '.join(ENGINES)}")
