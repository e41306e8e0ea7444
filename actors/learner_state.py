"""The learner's training state beyond its adapter, for an exact resume: optimizer (DeepSpeed's
ZeRO state at stage 1/2, AdamW's at 0), LR-scheduler position, DeepSpeed's step counters,
policy version, skipped steps and RNG states; one file per data-parallel rank."""

from __future__ import annotations

from pathlib import Path

import torch

from actors import distributed

ADAPTER_DIR = "adapter"
_ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


def _hyper(base_lrs, groups) -> dict:
    return {"base_lrs": [float(x) for x in base_lrs],
            **{k: [list(g[k]) if isinstance(g[k], tuple) else g[k] for g in groups]
               for k in ("betas", "eps", "weight_decay")}}


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _state_file() -> str:
    return "learner_state.pt" if distributed.world_size() == 1 else f"learner_state.rank{_rank()}.pt"


def state_dict(learner) -> dict:
    """This rank's training state beyond the adapter weights: optimizer (DeepSpeed's ZeRO
    state at stage 1/2, AdamW's at 0), LR-scheduler position, DeepSpeed's step counters,
    policy_version, skipped_total and the torch RNG. With the adapter, what an exact resume
    needs (see :func:`save_state`). The optimizer tensors are live: save before stepping."""
    engine, opt = learner.engine, learner.engine.lr_scheduler.optimizer
    cuda = learner.device.type == "cuda"
    return {
        "format": 1, "zero_stage": learner.zero_stage, "world_size": distributed.world_size(),
        "hyper": _hyper(engine.lr_scheduler.base_lrs, opt.param_groups),
        "optimizer": engine.optimizer.state_dict(),
        "lr_scheduler": engine.lr_scheduler.state_dict(),
        "engine_counters": {k: getattr(engine, k) for k in _ENGINE_COUNTERS},
        "policy_version": learner.policy_version, "skipped_total": learner.skipped_total,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(learner.device) if cuda else None,
    }

def load_state_dict(learner, state: dict) -> None:
    """Restore :func:`state_dict`'s output into a learner built with the same settings (the
    adapter weights come separately: :meth:`Learner.load_adapter`, before this). A different ZeRO
    stage, world size or optimizer hyperparameter is an error, not silently overwritten."""
    current = {"zero_stage": learner.zero_stage, "world_size": distributed.world_size(),
               "hyper": _hyper(learner.engine.lr_scheduler.base_lrs,
                               learner.engine.lr_scheduler.optimizer.param_groups)}
    diff = {k: (state.get(k), v) for k, v in current.items() if state.get(k) != v}
    if diff:
        raise ValueError("learner state does not match this learner (saved, configured): "
                         + ", ".join(f"{k}: {a} vs {b}" for k, (a, b) in diff.items()))
    if learner.zero_stage == 0:
        learner.engine.optimizer.load_state_dict(state["optimizer"])
    else:  # the saved float32 partitions, not a copy of the module's weights
        learner.engine.optimizer.load_state_dict([state["optimizer"]], load_optimizer_states=True,
                                              load_from_fp32_weights=True)
    learner.engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    for key, value in state["engine_counters"].items():
        setattr(learner.engine, key, value)
    learner.policy_version, learner.skipped_total = state["policy_version"], state["skipped_total"]
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and learner.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], learner.device)

def save_state(learner, folder: str | Path) -> Path:
    """Write ``folder/adapter/`` (PEFT format, rank 0) and this rank's
    ``folder/learner_state.pt`` (``learner_state.rank<r>.pt`` when there are several)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if _rank() == 0:
        learner.save_adapter(folder / ADAPTER_DIR)
    torch.save(state_dict(learner), folder / _state_file())
    return folder

def load_state(learner, folder: str | Path) -> None:
    """Load what :func:`save_state` wrote: the adapter, then the optimizer and counters."""
    folder = Path(folder)
    learner.load_adapter(folder / ADAPTER_DIR)
    # Our own file, and it holds DeepSpeed objects (the ZeRO loss scaler): not weights_only.
    # CPU: RNG states must stay CPU tensors; load_state_dict moves the rest to the params.
    load_state_dict(learner, torch.load(folder / _state_file(), map_location="cpu",
                                    weights_only=False))
