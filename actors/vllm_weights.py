"""Merged-mode weight updates for :class:`actors.rollout_vllm.VLLMRolloutEngine`: the one place
that reaches past vLLM's public API.

``LLM.collective_rpc`` (public) runs a function on the engine's worker; what that function
touches, ``worker.reload_weights``, is vLLM's internal worker interface (``model.load_weights``
alone fails on CPU, which repacks and empties the loaded weights). It takes Hugging Face
parameter names and packs q/k/v and gate/up itself. When it moves, the first merged update fails
naming the vLLM version.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

PREFIX, A, B = "base_model.model.", ".lora_A.weight", ".lora_B.weight"


def load_weights_on_worker(worker: Any, weights: list[tuple[str, Tensor]]) -> int:
    """Run on vLLM's worker by ``collective_rpc``: copy ``weights`` into its model; the count."""
    try:
        reload = worker.reload_weights
    except AttributeError as error:
        import vllm

        raise RuntimeError(f"vLLM {vllm.__version__}: worker.reload_weights is gone ({error}); the merged "
                           "adapter mode (actors/vllm_weights.py) needs updating for this vLLM, or use "
                           "rollout.vllm_adapter_mode lora") from error
    reload(weights_iterator=weights, is_checkpoint_format=True)
    return len(weights)


class MergedWeights:
    """Every projection's base weight (kept on CPU) and the merge ``W + scale * B @ A``.

    Each update sends every projection, merged where the adapter targets it and unchanged
    where not: vLLM rebuilds a packed weight (q/k/v, gate/up) from the pieces it is sent, so a
    piece left out (``v_proj`` when only ``q_proj`` is targeted) would not keep its old value.
    """

    def __init__(self, llm: Any, model_folder: str | os.PathLike[str], config: dict, dtype: torch.dtype):
        from safetensors import safe_open

        self.llm, self.dtype = llm, dtype
        rank = config["r"]
        self.scale = config["lora_alpha"] / (rank ** 0.5 if config["use_rslora"] else rank)
        self.base: dict[str, Tensor] = {}
        for file in sorted(Path(model_folder).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                self.base.update({k: f.get_tensor(k).float() for k in f.keys() if k.endswith("proj.weight")})

    def load(self, tensors: dict[str, Tensor]) -> None:
        """Merge one full set of LoRA tensors into the served weights; reset the prefix cache
        (its blocks were computed with the old weights)."""
        weights = []
        for name, base in sorted(self.base.items()):
            module = name.removesuffix(".weight")
            if PREFIX + module + A in tensors:
                lora_a, lora_b = tensors[PREFIX + module + A].float(), tensors[PREFIX + module + B].float()
                base = base + self.scale * (lora_b @ lora_a)
            weights.append((name, base.to(self.dtype)))
        self.llm.collective_rpc(load_weights_on_worker, args=(weights,))
        self.llm.reset_prefix_cache()
