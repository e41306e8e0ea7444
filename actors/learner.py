"""The learner: one GRPO optimizer step over a batch of groups, with DeepSpeed and a PEFT LoRA.

The base model is frozen; only the LoRA tensors train. The reference policy for the KL term is
the same model with the adapter disabled (``PeftModel.disable_adapter``): no second copy of the
weights, and no reference pass at all when ``kl_coef == 0``.

One :meth:`Learner.train_step` = one optimizer step:

1. The groups are packed into micro-batches under a token budget (``micro_batch_tokens``: the
   tokens fed to the model, padding included). A group is the unit, since its prompt is computed
   once for all its completions (actors/shared_prefix.py); a group over the budget is split into
   slices of its completions, each slice with its own prompt pass.
2. Each micro-batch: completion log-probs (at the sampling temperature), the old log-probs as the
   detached current ones (one optimizer step per batch, so the ratio is 1 and its gradient is the
   policy gradient), the TIS weight against the rollout log-probs when ``tis_cap`` is set, the
   reference log-probs when ``kl_coef > 0``; :func:`rl.grpo.grpo_loss`, scaled by the micro-batch's
   share of the batch's normaliser (tokens, sequences or rows, as ``loss_aggregation`` counts
   them), so that the sum over micro-batches equals the loss of the unsplit batch; backward.
3. The gradient's global norm is checked: a non-finite loss or gradient zeroes the gradient and
   skips the step (counted in ``skipped_total``; weights, optimizer state and learning-rate
   schedule untouched). Otherwise DeepSpeed clips to ``max_grad_norm`` and steps, and
   ``policy_version`` advances.

DeepSpeed: ZeRO stage 0-2, one process or launched by a launcher; gloo on CPU (see
actors/distributed.py). DeepSpeed does not own precision here: with ``precision="bfloat16"``
(``auto`` on a bf16-capable GPU) the frozen base weights and activations are bf16 while PEFT keeps
the LoRA tensors in float32, so the optimizer updates float32 weights directly -- what DeepSpeed's
bf16 mode achieves with master copies. Our own ``torch.optim.AdamW`` is handed to DeepSpeed, so no
DeepSpeed optimizer op is compiled. Gradient accumulation is ours (``managed_gradient_accumulation``
off: every ``engine.step()`` is a boundary).

Adapters are saved in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``),
which transformers + PEFT and vLLM load as is; :meth:`Learner.export_adapter` gives the same
tensors under the same names for weight sync.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from actors import distributed  # first: sets TORCH_EXTENSIONS_DIR before deepspeed is imported

import torch
from torch import Tensor

from actors import learner_state
from actors.lr_schedule import Schedule, lr_factor
from actors.models import load_causal_lm, resolve_dtype
from actors.shared_prefix import RowBatch, Unit, completion_logits, pack_micro_batches
from rl.grpo import (GRPOStats, aggregate, completion_mask, entropy_from_logits, grpo_loss,
                     token_logprobs)
from rl.records import TrainGroup

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRECISIONS = ("auto", "float32", "bfloat16")
AGGREGATIONS = ("token_mean", "sequence_mean", "constant")
OPTIMIZERS = ("adamw", "adamw_8bit")
OBJECTIVES = ("grpo", "sft")


@dataclass(frozen=True)
class LearnStats:
    """What one train_step did. loss: the batch loss (the sum of the scaled micro-batch losses);
    grad_norm: global LoRA gradient norm before clipping (nan when non-finite); kl: mean k3 KL
    per token (0.0 when kl_coef == 0); clip_fraction, entropy: means over the batch's trained
    tokens; tokens: trained (unmasked) completion tokens; skipped: no optimizer step was taken
    (non-finite loss or gradient, or no token to train on); skipped_total: such steps so far;
    lr: the learning rate of this step; seconds: wall time; micro_batches: forward/backward
    passes; gpu_peak_gb: the step's peak GPU memory allocated by torch (None on CPU)."""

    loss: float
    grad_norm: float
    kl: float
    clip_fraction: float
    entropy: float
    tokens: int
    skipped: bool
    skipped_total: int
    lr: float
    seconds: float
    micro_batches: int
    gpu_peak_gb: float | None = None


@dataclass
class Accumulated:
    """Sums over the micro-batches of one backward_batch (kl, clip, entropy: token-weighted)."""

    micro_batches: int
    loss: float = 0.0
    kl: float = 0.0
    clip: float = 0.0
    entropy: float = 0.0
    tokens: int = 0
    finite: bool = True


# --------------------------------------------------------------------------------------------
# Pure helpers


def normaliser(mask: Tensor, mode: str) -> Tensor:
    """The count rl.grpo.aggregate divides by (up to constant_normaliser): tokens for
    token_mean, sequences with a token for sequence_mean, rows for constant."""
    if mode == "token_mean":
        return mask.sum()
    if mode == "sequence_mean":
        return (mask.sum(dim=1) > 0).sum()
    return torch.tensor(mask.shape[0], device=mask.device)


# --------------------------------------------------------------------------------------------
# The learner


class Learner:
    """DeepSpeed + PEFT LoRA GRPO learner; flat arguments (from the config's model, lora,
    learner, algorithm and rollout sections). See the module docstring."""

    def __init__(self, model_path: str, *, lora_rank: int = 16, lora_alpha: float = 32.0,
                 lora_dropout: float = 0.0, target_modules: Sequence[str] = ALL_LINEAR,
                 use_rslora: bool = False, init_adapter: str | None = None, lr: float = 5e-6,
                 weight_decay: float = 0.001, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, warmup_steps: int = 0, total_steps: int = 1,
                 lr_schedule: str = "linear", max_grad_norm: float = 1.0, zero_stage: int = 0,
                 micro_batch_tokens: int = 8192, precision: str = "auto",
                 gradient_checkpointing: bool = False, clip_eps_low: float = 0.2,
                 clip_eps_high: float = 0.2, kl_coef: float = 0.0,
                 loss_aggregation: str = "token_mean", constant_normaliser: int | None = None,
                 tis_cap: float | None = 2.0, mask_truncated: bool = False,
                 temperature: float = 1.0, shared_prefix: bool = True, optimizer: str = "adamw",
                 sft_steps: int = 0, sft_lr: float | None = None, device: str = "cpu", seed: int = 0,
                 load_options: dict | None = None):
        if zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage={zero_stage}: the learner supports ZeRO stages 0, 1, 2")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} is not one of {OPTIMIZERS}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
        if loss_aggregation not in AGGREGATIONS:
            raise ValueError(f"loss_aggregation={loss_aggregation!r} is not one of {AGGREGATIONS}")
        if loss_aggregation == "constant" and not (constant_normaliser or 0) >= 1:
            raise ValueError("loss_aggregation='constant' needs constant_normaliser >= 1 "
                             "(e.g. the rollout's max_new_tokens)")
        if micro_batch_tokens < 1 or temperature <= 0:
            raise ValueError("micro_batch_tokens must be >= 1 and temperature > 0")
        lr_factor(0, warmup_steps, total_steps, lr_schedule)  # validates the schedule name
        self.device = torch.device(device)
        self.dtype = resolve_dtype(precision, self.device)
        self.micro_batch_tokens = micro_batch_tokens
        self.loss_kwargs = dict(eps_low=clip_eps_low, eps_high=clip_eps_high, kl_coef=kl_coef,
                                agg=loss_aggregation, constant_normaliser=constant_normaliser,
                                is_cap=tis_cap if tis_cap is not None else 1.0)
        self.kl_coef, self.tis_cap = kl_coef, tis_cap
        self.mask_truncated, self.temperature = mask_truncated, temperature
        # transformers drops the KV cache under gradient checkpointing in training mode.
        self.shared_prefix = shared_prefix and not gradient_checkpointing
        self.zero_stage = zero_stage
        self.policy_version = 0
        self.skipped_total = 0

        torch.manual_seed(seed)
        self.model_name = model_path
        module = self._build_model(model_path, lora_rank, lora_alpha, lora_dropout,
                                   tuple(target_modules), use_rslora, init_adapter,
                                   gradient_checkpointing, load_options or {})
        self.pad_id = int(module.config.pad_token_id or 0)
        opt = self._optimizer(optimizer, module, lr=lr, betas=tuple(betas), eps=eps,
                              weight_decay=weight_decay)
        sft_factor = (sft_lr / lr if lr > 0 else 0.0) if sft_lr is not None else 1.0
        schedule = Schedule(sft_steps, sft_factor, sft_steps, warmup_steps, total_steps, lr_schedule)
        self.engine = self._build_engine(module, opt, schedule, max_grad_norm, zero_stage)
        self.module = self.engine.module
        self.params = [p for p in self.module.parameters() if p.requires_grad]

    def configure_stage(self, *, lr: float, warmup_steps: int, total_steps: int, kl_coef: float,
                        temperature: float, constant_normaliser: int, restart_schedule: bool = True) -> None:
        """Take a curriculum stage's settings (rl/curriculum.py); the optimizer state is kept.
        ``restart_schedule``: the lr schedule starts over from this optimizer step, peaking at
        ``lr`` (false on a resume mid-stage: the checkpoint's scheduler state already holds it)."""
        self.kl_coef, self.temperature = kl_coef, temperature
        self.loss_kwargs.update(kl_coef=kl_coef, constant_normaliser=constant_normaliser)
        if not restart_schedule:
            return
        scheduler = self.engine.lr_scheduler
        base = scheduler.base_lrs[0]
        schedule = scheduler.lr_lambdas[0]
        schedule.restart(scheduler.last_epoch, lr / base if base > 0 else 0.0, warmup_steps, total_steps)
        for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * schedule(scheduler.last_epoch)

    # ---------------------------------------------------------------- construction
    def _build_model(self, model_path, rank, alpha, dropout, targets, use_rslora, init_adapter,
                     gradient_checkpointing, load_options):
        from peft import LoraConfig, PeftModel, get_peft_model

        base = load_causal_lm(model_path, dtype=self.dtype, device=self.device, **load_options)
        if gradient_checkpointing:
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        if init_adapter is not None:
            self._check_adapter_matches(init_adapter, rank, targets)
            model = PeftModel.from_pretrained(base, init_adapter, is_trainable=True)
        else:
            lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora,
                              target_modules=list(targets), bias="none", task_type="CAUSAL_LM")
            model = get_peft_model(base, lora)  # LoRA weights in float32 even on a bf16 base
        model.train()
        return model

    @staticmethod
    def _check_adapter_matches(path, rank: int, targets: Sequence[str]) -> None:
        cfg = json.loads((Path(path) / "adapter_config.json").read_text())
        if cfg.get("r") != rank or set(cfg.get("target_modules") or ()) != set(targets):
            raise ValueError(f"adapter {path}: rank {cfg.get('r')} and targets "
                             f"{sorted(cfg.get('target_modules') or ())} do not match the "
                             f"configured rank {rank} and targets {sorted(targets)}")

    def _optimizer(self, name: str, module, **kwargs) -> torch.optim.Optimizer:
        params = [p for p in module.parameters() if p.requires_grad]
        if name == "adamw":  # foreach: one kernel per op over all tensors, 10x faster on CPU
            return torch.optim.AdamW(params, foreach=True, **kwargs)
        if self.device.type != "cuda":
            raise ValueError("optimizer='adamw_8bit' needs a CUDA device (bitsandbytes)")
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ImportError("optimizer='adamw_8bit' needs `pip install bitsandbytes`") from err
        return bnb.optim.AdamW8bit(params, **kwargs)

    def _build_engine(self, module, optimizer, schedule, max_grad_norm, zero_stage):
        distributed.init_distributed(str(self.device))
        import deepspeed

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,  # we accumulate; step() is the boundary
            "gradient_clipping": float(max_grad_norm),
            "zero_optimization": {"stage": zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer,
                                          lr_scheduler=scheduler, config=config)
        return engine

    # ---------------------------------------------------------------- the step
    def train_step(self, groups: Sequence[TrainGroup], objective: str = "grpo") -> LearnStats:
        """One optimizer step over all groups (see the module docstring). ``objective="sft"``:
        the mean negative log-likelihood of the completion tokens instead of the GRPO loss
        (advantages and rollout log-probs unused): supervised fine-tuning on the same engine."""
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r} is not one of {OBJECTIVES}")
        t0 = time.perf_counter()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        lr = self.engine.get_lr()[0]
        acc = self.backward_batch(groups, objective)
        if distributed.all_ranks(acc.tokens == 0 and acc.finite):  # no rank had a token to train
            grad_norm, applied = 0.0, False
        elif self.zero_stage == 0:  # plain param.grad: DeepSpeed would step on a NaN
            grad_norm = self._grad_norm()  # this rank's, before the all-reduce
            applied = distributed.all_ranks(math.isfinite(grad_norm))
            self.engine.step() if applied else self.engine.zero_grad()
        else:  # ZeRO 1/2 find a non-finite norm, clear their partitions and skip the update
            self.engine.step()
            applied = self.engine.was_step_applied()
            grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
        if applied:
            self.policy_version += 1
        else:
            self.skipped_total += 1
        n = max(1, acc.tokens)
        return LearnStats(loss=acc.loss, grad_norm=grad_norm if applied else float("nan"),
                          kl=acc.kl / n, clip_fraction=acc.clip / n, entropy=acc.entropy / n,
                          tokens=acc.tokens, skipped=not applied,
                          skipped_total=self.skipped_total, lr=lr,
                          seconds=time.perf_counter() - t0, micro_batches=acc.micro_batches,
                          gpu_peak_gb=torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else None)

    def backward_batch(self, groups: Sequence[TrainGroup], objective: str = "grpo") -> "Accumulated":
        """Forward and backward over all groups, micro-batch by micro-batch, leaving the batch's
        gradient accumulated (no step). A non-finite micro-batch loss ends the pass with a NaN
        gradient in every trained tensor, so that no stage can step on it."""
        ranks = distributed.world_size()
        if not groups and ranks == 1:
            raise ValueError("a step needs at least one group")
        micro = pack_micro_batches(groups, self.micro_batch_tokens, self.shared_prefix) if groups else []
        sft = objective == "sft"
        tensors = [self._tensors(units, with_rollout=not sft) for units in micro]
        agg = "token_mean" if sft else self.loss_kwargs["agg"]
        counts = [float(normaliser(t["mask"], agg)) for t in tensors]
        # Data parallel: each rank's share of the global normaliser, times the ranks, since the
        # step's all-reduce averages the ranks' gradients: the sum is the whole batch's loss.
        total = distributed.all_reduce_sum(sum(counts)) / ranks
        acc = Accumulated(micro_batches=len(micro))
        if int(total * ranks) == 0:
            return acc
        if not micro:  # a rank without groups still contributes (zero) gradients to the all-reduce
            self.engine.backward(sum(p.sum() for p in self.params) * 0.0, scale_wrt_gas=False)
            return acc
        for t, count in zip(tensors, counts):
            loss, stats, entropy = self._micro_loss(t, sft)
            loss = loss * (count / total)
            if not torch.isfinite(loss):
                poison = sum(p.sum() for p in self.params) * float("nan")
                self.engine.backward(poison, scale_wrt_gas=False)
                acc.finite, acc.loss = False, float("nan")
                return acc
            self.engine.backward(loss, scale_wrt_gas=False)
            n = stats.n_tokens
            acc.loss += loss.item()
            acc.kl += (stats.kl_mean or 0.0) * n
            acc.clip += stats.clip_frac * n
            acc.entropy += entropy * n
            acc.tokens += n
        return acc

    def gradients(self) -> dict[str, Tensor | None]:
        """The accumulated gradient of each trained tensor by name (ZeRO 0/1: ``param.grad``;
        ZeRO 2 keeps it in its partitions until the step, so None)."""
        return {n: p.grad for n, p in self.module.named_parameters() if p.requires_grad}

    def _grad_norm(self) -> float:
        norms = [p.grad.float().norm() for p in self.params if p.grad is not None]
        return float(torch.stack(norms).norm()) if norms else 0.0

    def _tensors(self, units: Sequence[Unit], with_rollout: bool = True) -> dict:
        """The micro-batch's rows as a RowBatch and padded tensors on the device."""
        batch = RowBatch.build([u.prompt for u in units],
                               [i for i, u in enumerate(units) for _ in u.completions],
                               [c for u in units for c in u.completions])
        tokens, lengths = batch.completion_tokens(self.device, self.pad_id)
        truncated = torch.tensor([t for u in units for t in u.truncated], device=self.device)
        mask = completion_mask(lengths, tokens.shape[1], truncated, self.mask_truncated)
        context = torch.tensor([k for u in units for k in u.context], device=self.device)
        mask &= torch.arange(tokens.shape[1], device=self.device) >= context[:, None]
        adv = torch.tensor([a for u in units for a in u.advantages], device=self.device)
        rollout = None
        if self.tis_cap is not None and with_rollout:
            rows = [r for u in units for r in u.rollout_logprobs]
            if any(len(r) != len(c) for r, c in zip(rows, batch.completions)):
                raise ValueError("rollout_logprobs must have one value per completion token")
            rollout = torch.zeros(tokens.shape, dtype=torch.float32, device=self.device)
            for i, r in enumerate(rows):
                rollout[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
        return dict(batch=batch, tokens=tokens, mask=mask, adv=adv, rollout=rollout)

    def _logprobs(self, batch: RowBatch, tokens: Tensor) -> tuple[Tensor, Tensor]:
        logits = completion_logits(self.module, batch, self.pad_id, self.shared_prefix)
        return token_logprobs(logits, tokens, self.temperature), logits

    def _micro_loss(self, t: dict, sft: bool = False):
        ref = None
        if self.kl_coef > 0 and not sft:
            ref = self.reference_logprobs(t["batch"], t["tokens"])
        logp, logits = self._logprobs(t["batch"], t["tokens"])
        with torch.no_grad():
            ent = entropy_from_logits(logits.detach())
            ent = float(torch.where(t["mask"], ent, 0).sum() / t["mask"].sum().clamp(min=1))
        if sft:
            loss = aggregate(-logp, t["mask"], "token_mean")
            return loss, GRPOStats(0.0, 1.0, 1.0, None, None, int(t["mask"].sum())), ent
        loss, stats = grpo_loss(logp, logp.detach(), t["adv"], t["mask"], ref_logp=ref,
                                rollout_logp=t["rollout"], **self.loss_kwargs)
        return loss, stats, ent

    @torch.no_grad()
    def reference_logprobs(self, batch: RowBatch, tokens: Tensor) -> Tensor:
        """Log-probs [B, Cmax] of the base model: the adapter disabled, in eval mode."""
        self.module.eval()
        try:
            with self.module.disable_adapter():
                return self._logprobs(batch, tokens)[0]
        finally:
            self.module.train()

    # ---------------------------------------------------------------- adapter I/O
    def export_adapter(self) -> dict[str, Tensor]:
        """The LoRA tensors, named as peft.get_peft_model_state_dict names them; CPU, contiguous."""
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.module)
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}

    def save_adapter(self, path: str | Path) -> Path:
        """Write adapter_config.json + adapter_model.safetensors (PEFT's format) into path, the
        base model named portably (the embedded model's hub id, not this machine's cache path)."""
        from actors.lora_tensors import set_portable_base

        path = Path(path)
        self.module.save_pretrained(path, safe_serialization=True)
        set_portable_base(path, self.model_name)
        return path

    @torch.no_grad()
    def load_adapter(self, path: str | Path) -> None:
        """Load a saved adapter's weights (same rank and targets) into the trained adapter.
        The optimizer state is kept."""
        from deepspeed.utils import safe_set_full_fp32_param
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        cfg = self.module.peft_config["default"]
        self._check_adapter_matches(path, cfg.r, tuple(cfg.target_modules))
        state = load_file(str(Path(path) / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(self.module, state)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise ValueError(f"adapter {path}: missing {missing[:3]}, unexpected "
                             f"{list(result.unexpected_keys)[:3]}")
        for p in self.params:  # ZeRO 1/2 keep their own float32 copy of each trained tensor
            safe_set_full_fp32_param(p, p.data.float())

    # ---------------------------------------------------------------- training state (resume)
    def state_dict(self) -> dict:
        """This rank's training state beyond the adapter weights (actors/learner_state.py)."""
        return learner_state.state_dict(self)

    def load_state_dict(self, state: dict) -> None:
        learner_state.load_state_dict(self, state)

    def save_state(self, folder: str | Path) -> Path:
        """``folder/adapter/`` (rank 0) and this rank's optimizer state (actors/learner_state.py)."""
        return learner_state.save_state(self, folder)

    def load_state(self, folder: str | Path) -> None:
        learner_state.load_state(self, folder)
