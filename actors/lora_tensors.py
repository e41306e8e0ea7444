"""The LoRA tensors the engines take: their names and shapes, checks, and PEFT's folder format.

Names are PEFT's (``peft.get_peft_model_state_dict``: ``base_model.model.<module>.lora_A.weight``),
the ones the learner exports. :func:`lora_shapes` finds them for a base model without loading
its weights: PEFT wraps a copy of the model built on the meta device, so the names and shapes
are exactly the learner's, whatever the architecture.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

PORTABLE_EMBEDDED = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The embedded model's hub id: what a saved adapter names as its base (never a cache path)."""


def portable_base_name(name_or_path: str | os.PathLike[str]) -> str:
    """The base model as a saved adapter records it: the embedded model's hub id, else the name
    the user configured (a hub id or their own folder), never this machine's cache path."""
    from actors.models import EMBEDDED_MODEL

    value = os.fspath(name_or_path)
    return PORTABLE_EMBEDDED if value == EMBEDDED_MODEL else value


def peft_config(rank: int, alpha: float, targets: Sequence[str] | str, *, dropout: float = 0.0,
                use_rslora: bool = False, base_model: str = "") -> dict:
    """``adapter_config.json`` of a causal-LM LoRA (what PEFT and vLLM read)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
            "lora_dropout": dropout, "use_rslora": use_rslora, "bias": "none",
            "target_modules": targets if isinstance(targets, str) else sorted(targets),
            "base_model_name_or_path": base_model, "fan_in_fan_out": False,
            "init_lora_weights": True, "modules_to_save": None}


def lora_shapes(model_folder: str | os.PathLike[str], config: dict,
                trust_remote_code: bool = False) -> dict[str, tuple[int, ...]]:
    """Every LoRA tensor's name and shape for the model in ``model_folder`` under ``config``
    (:func:`peft_config`), from a weightless (meta-device) copy of the model."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    lora = LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], target_modules=config["target_modules"],
                      task_type="CAUSAL_LM")
    with torch.device("meta"):
        model_config = AutoConfig.from_pretrained(model_folder, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
        state = get_peft_model_state_dict(get_peft_model(model, lora))
    return {name: tuple(t.shape) for name, t in state.items()}


def check_lora_tensors(shapes: Mapping[str, tuple[int, ...]], tensors: Mapping[str, Tensor]) -> None:
    """Raise unless ``tensors`` holds exactly the named tensors of ``shapes``, each that shape."""
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        raise KeyError(f"LoRA tensors do not match the adapter: missing {missing[:4]} "
                       f"({len(missing)}), unexpected {unexpected[:4]} ({len(unexpected)})")
    bad = [k for k, v in tensors.items() if tuple(v.shape) != tuple(shapes[k])]
    if bad:
        raise ValueError(f"shape mismatch for {bad[:4]}: e.g. {tuple(tensors[bad[0]].shape)} "
                         f"!= {tuple(shapes[bad[0]])}")


def write_peft_adapter(folder: str | os.PathLike[str], tensors: Mapping[str, Tensor], config: dict) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` in ``folder`` (created)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def set_portable_base(folder: str | os.PathLike[str], name_or_path: str | os.PathLike[str]) -> None:
    """Rewrite a saved adapter's ``base_model_name_or_path`` (PEFT writes the folder it loaded
    the base from, a path on this machine) to :func:`portable_base_name`."""
    path = Path(folder) / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = portable_base_name(name_or_path)
    path.write_text(json.dumps(config, indent=2) + "\n")


def read_adapter(adapter: str | os.PathLike[str] | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors of a PEFT adapter folder (or the state dict itself)."""
    if isinstance(adapter, Mapping):
        return dict(adapter)
    from safetensors.torch import load_file

    return load_file(str(Path(adapter) / "adapter_model.safetensors"))
