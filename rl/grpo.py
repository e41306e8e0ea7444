"""GRPO math as small pure torch functions.

For a prompt the rollout engine samples a group of G completions; each gets a scalar reward
R_i. The advantage of completion i is its reward centred on the group mean, optionally divided
by the group's (population) std:  A_i = (R_i - mean_g) / (std_g + eps). Every token t of that
completion shares A_i. The loss minimised is

    L = agg_t[ -min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i) * w_t + beta * k3_t ]

  r_t  = pi_theta(y_t) / pi_old(y_t)         ratio to the policy that produced the batch
  w_t  = min(pi_old(y_t) / pi_rollout(y_t), C)  truncated importance weight (TIS): the sampler
         (vLLM, bf16, its own kernels) is not bit-identical to the learner, so its log-probs
         differ; w_t corrects for that mismatch and the cap C bounds the variance. Detached.
  k3_t = exp(ref - logp) - (ref - logp) - 1   Schulman's unbiased, nonnegative KL estimator
         to the reference policy (the base model with the adapter disabled); beta may be 0.
  agg  = masked aggregation over tokens (padding and, optionally, truncated completions).

The variants are settings of the same functions:
  GRPO     scale="std",  agg="sequence_mean", eps_low = eps_high, beta > 0.
  DAPO     scale="std",  agg="token_mean", clip-higher (eps_high > eps_low, e.g. 0.2/0.28),
           beta = 0, dynamic sampling (drop zero-variance groups and refill the batch,
           `select_informative_groups`), overlong filtering (`mask_truncated=True`).
  Dr.GRPO  scale="none", agg="constant" (sum / (B * max completion length)), beta = 0.

Left out: a value function, dual-clip PPO, sequence-level ratios (GSPO), an entropy bonus
(entropy is a metric here), DAPO's soft overlong penalty (that is reward shaping, done by the
reward code), and normalising across micro-batches or data-parallel ranks: `aggregate` sees one
micro-batch, so under gradient accumulation the caller weights micro-batches itself.

Shapes: B completions (rows), T completion tokens (right-padded), V vocabulary, N prompts,
G completions per prompt. All log-probs are float32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, Sequence, get_args

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

AdvantageScale = Literal["std", "none"]
AggMode = Literal["token_mean", "sequence_mean", "constant"]

# exp(20) ~ 4.9e8 is finite in float32 and bf16; beyond it a single stale token would give
# inf/NaN losses and gradients. Such tokens are clipped (surrogate) or negligible anyway.
LOG_RATIO_CLAMP = 20.0


def _check_choice(name: str, value: str, literal) -> None:
    allowed = get_args(literal)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


# --------------------------------------------------------------------------- log-probs
def _chunked_rows(fn, logits: Tensor, *row_args: Tensor, chunk_rows: int) -> Tensor:
    """Apply fn to [rows, V] chunks of logits (and matching [rows] args); returns [...] float32.

    With autograd on, each chunk is checkpointed: its float32 copy exists only during its own
    forward and its own backward, never the full [B, T, V] float32 tensor at once.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    args = [a.reshape(-1) for a in row_args]
    use_ckpt = torch.is_grad_enabled() and logits.requires_grad
    outs = []
    for i, z in enumerate(flat.split(chunk_rows)):
        a = [x[i * chunk_rows : i * chunk_rows + z.shape[0]] for x in args]
        outs.append(checkpoint(fn, z, *a, use_reentrant=False) if use_ckpt else fn(z, *a))
    if not outs:
        return logits.new_zeros(logits.shape[:-1], dtype=torch.float32)
    return torch.cat(outs).reshape(logits.shape[:-1])


def _logprob_rows(z: Tensor, tok: Tensor, temperature: float) -> Tensor:
    z = z.float() / temperature if temperature != 1.0 else z.float()
    # gather - logsumexp: never materialises the [rows, V] log_softmax output.
    return z.gather(-1, tok[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)


def _entropy_rows(z: Tensor) -> Tensor:
    z = z.float()
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)


def token_logprobs(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_rows: int = 4096
) -> Tensor:
    """Log-probability of each target token, float32 [B, T].

    logits: [B, T, V], any float dtype (upcast to float32 chunk by chunk). Aligned so that
        logits[:, t] is the distribution that predicts tokens[:, t]: the caller has already
        dropped the last position of a causal LM's output and the first of its input.
    tokens: [B, T] int64 token ids; padded positions need only be valid ids.
    temperature: the sampling temperature, so the log-probs match what the sampler drew from.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    fn = functools.partial(_logprob_rows, temperature=temperature)
    return _chunked_rows(fn, logits, tokens, chunk_rows=chunk_rows)


def entropy_from_logits(logits: Tensor, chunk_rows: int = 4096) -> Tensor:
    """Entropy of each position's next-token distribution, float32 [B, T]; logits [B, T, V]."""
    return _chunked_rows(_entropy_rows, logits, chunk_rows=chunk_rows)


# --------------------------------------------------------------------------- advantages
def _as_groups(rewards: Tensor, group_size: int) -> Tensor:
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if rewards.dim() == 2 and rewards.shape[1] != group_size:
        raise ValueError(f"rewards {tuple(rewards.shape)} are not [N, {group_size}]")
    return rewards.float().reshape(-1, group_size)


def group_advantages(
    rewards: Tensor, group_size: int, scale: AdvantageScale = "std", eps: float = 1e-6
) -> Tensor:
    """Group-relative advantages, same shape as rewards ([N * G] grouped consecutively, or [N, G]).

    Rewards are centred on their group's mean; with scale="std" they are divided by
    (std + eps), where std is the *population* std (divide by G, not G - 1): a 0/1 group with
    one success in two gets +-1. TRL and verl use the sample std, larger by sqrt(G / (G - 1)).
    A zero-variance group gets advantages of exactly 0. float32.
    """
    _check_choice("scale", scale, AdvantageScale)
    g = _as_groups(rewards, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale == "std":
        centred = centred / (g.std(dim=1, unbiased=False, keepdim=True) + eps)
    return centred.reshape(rewards.shape)


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """Bool [N]: True where all G rewards of a group are equal (no learning signal)."""
    g = _as_groups(rewards, group_size)
    return g.amax(dim=1) == g.amin(dim=1)


@dataclass(frozen=True)
class GroupSelection:
    """What to do with the groups collected so far in one step (see select_informative_groups).

    kept: indices of the groups to train on, in order, at most target_groups of them.
    dropped: indices of zero-variance groups (to count and log; never trained on).
    surplus: informative groups beyond the target, left unused.
    missing: target_groups - len(kept).
    need_more: sample more prompts (missing > 0 and refill rounds remain).
    exhausted: missing > 0 but the refill bound is reached: train on `kept` (maybe none).
    """

    kept: list[int]
    dropped: list[int]
    surplus: int
    missing: int
    need_more: bool
    exhausted: bool


def select_informative_groups(
    groups: Sequence[Sequence[float]],
    target_groups: int,
    refill_rounds: int,
    max_refill_rounds: int,
) -> GroupSelection:
    """DAPO's dynamic sampling as a pure decision over plain data.

    groups: every group's rewards collected so far this step, first round then each refill.
    refill_rounds: refill rounds already done (0 after the first generation).
    The caller loops: generate, call this, and while `need_more` generate `missing` (or more)
    further prompts, append their groups and call again with refill_rounds + 1.
    """
    if target_groups < 1 or refill_rounds < 0 or max_refill_rounds < 0:
        raise ValueError("target_groups must be >= 1 and the round counts >= 0")
    if any(len(g) == 0 for g in groups):
        raise ValueError("every group needs at least one reward")
    flat = [all(r == g[0] for r in g) for g in groups]
    informative = [i for i, f in enumerate(flat) if not f]
    kept = informative[:target_groups]
    missing = target_groups - len(kept)
    need_more = missing > 0 and refill_rounds < max_refill_rounds
    return GroupSelection(
        kept=kept,
        dropped=[i for i, f in enumerate(flat) if f],
        surplus=len(informative) - len(kept),
        missing=missing,
        need_more=need_more,
        exhausted=missing > 0 and not need_more,
    )


# --------------------------------------------------------------------------- per-token terms
def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    is_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate per token, with separate low/high clip (clip-higher).

    logp, old_logp: [B, T] float32 (old_logp detached; on-policy it is logp.detach()).
    advantages: [B], one per completion. is_weight: optional [B, T] detached TIS weight.
    Returns per_token_loss [B, T] = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) * w and
    clipped [B, T] bool: tokens where the clipped branch wins, so their gradient is 0.
    """
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"clip ranges must be >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    adv = advantages[:, None].to(ratio.dtype)
    unclipped = ratio * adv
    clipped_obj = ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped_obj)
    if is_weight is not None:
        loss = loss * is_weight
    clipped = ((adv > 0) & (ratio > 1 + eps_high)) | ((adv < 0) & (ratio < 1 - eps_low))
    return loss, clipped


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 estimate of KL(pi_theta || pi_ref) per token, [B, T], >= 0 and 0 where equal.

    exp(d) - d - 1 with d = ref_logp - logp, clamped to +-LOG_RATIO_CLAMP: exp overflows
    float32 near 88, and one token the reference finds near-impossible must not make the
    loss inf or its gradient NaN.
    """
    d = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(d) - d - 1


def truncated_is_weight(old_logp: Tensor, rollout_logp: Tensor, cap: float = 2.0) -> Tensor:
    """TIS weight min(pi_learner / pi_sampler, cap) per token, [B, T], detached.

    old_logp: the learner's log-probs of the sampled tokens before the update;
    rollout_logp: the rollout engine's log-probs of the same tokens.
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    return torch.exp(old_logp - rollout_logp).clamp(max=cap).detach()


def completion_mask(
    lengths: Tensor, max_len: int, truncated: Tensor | None = None, mask_truncated: bool = False
) -> Tensor:
    """Bool [B, max_len]: True on the real tokens of each right-padded completion.

    lengths: [B] completion lengths in tokens. truncated: [B] bool, True where the sampler
    stopped at the length limit (finish_reason "length"). With mask_truncated, those rows are
    all False (DAPO's overlong filtering: a cut-off answer's reward says little about it).
    """
    if mask_truncated and truncated is None:
        raise ValueError("mask_truncated=True needs the truncated flags")
    mask = torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]
    if mask_truncated:
        mask = mask & ~truncated.to(torch.bool)[:, None]
    return mask


def aggregate(
    per_token_loss: Tensor,
    mask: Tensor,
    mode: AggMode = "token_mean",
    constant_normaliser: int | None = None,
) -> Tensor:
    """Reduce a [B, T] per-token loss over the True tokens of mask [B, T] to a scalar.

    token_mean (DAPO): sum over all tokens / token count; long answers weigh more.
    sequence_mean (GRPO): mean within each sequence, then mean over sequences that have any
        token (fully masked rows, e.g. filtered truncations, do not dilute the rest).
    constant (Dr.GRPO): sum / (B * constant_normaliser), e.g. the max completion length; no
        length bias, and the scale does not depend on the batch's content.
    An all-masked batch gives 0 that still carries a (zero) gradient, never NaN.
    """
    _check_choice("mode", mode, AggMode)
    # where, not multiply: padded positions may hold large values, and inf * 0 is NaN.
    masked = torch.where(mask, per_token_loss, torch.zeros_like(per_token_loss))
    if mode == "token_mean":
        return masked.sum() / mask.sum().clamp(min=1)
    if mode == "sequence_mean":
        counts = mask.sum(dim=1)
        per_seq = masked.sum(dim=1) / counts.clamp(min=1)
        return per_seq.sum() / (counts > 0).sum().clamp(min=1)
    if constant_normaliser is None or constant_normaliser < 1:
        raise ValueError(f"mode='constant' needs constant_normaliser >= 1: {constant_normaliser}")
    return masked.sum() / (per_token_loss.shape[0] * constant_normaliser)


# --------------------------------------------------------------------------- the loss
@dataclass(frozen=True)
class GRPOStats:
    """Diagnostics over the masked (real) tokens of one loss call; 0.0 when none are real."""

    clip_frac: float  # fraction of tokens whose clipped branch won (zero gradient)
    ratio_mean: float  # mean of pi_theta / pi_old
    ratio_max: float
    kl_mean: float | None  # mean k3 KL to the reference; None when kl_coef == 0
    is_weight_mean: float | None  # mean TIS weight; None without rollout log-probs
    n_tokens: int


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    rollout_logp: Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    kl_coef: float = 0.0,
    is_cap: float = 2.0,
    agg: AggMode = "token_mean",
    constant_normaliser: int | None = None,
) -> tuple[Tensor, GRPOStats]:
    """The scalar GRPO loss (to minimise) and its stats; see the module docstring.

    logp: [B, T] float32 with grad; old_logp, ref_logp, rollout_logp: [B, T] detached;
    advantages: [B]; mask: [B, T] bool (completion_mask). ref_logp may be None when
    kl_coef == 0; without rollout_logp there is no TIS correction.
    """
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp")
    is_w = None if rollout_logp is None else truncated_is_weight(old_logp, rollout_logp, is_cap)
    per_token, clipped = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high, is_w)
    kl = kl_k3(logp, ref_logp) if kl_coef > 0 else None
    if kl is not None:
        per_token = per_token + kl_coef * kl
    loss = aggregate(per_token, mask, agg, constant_normaliser)
    return loss, _stats(logp, old_logp, mask, clipped, kl, is_w)


@torch.no_grad()
def _stats(logp, old_logp, mask, clipped, kl, is_w) -> GRPOStats:
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    zero = ratio.new_zeros(())
    n = mask.sum()

    def mean(x: Tensor | None) -> Tensor:
        return zero if x is None else torch.where(mask, x.float(), zero).sum() / n.clamp(min=1)

    # ratios are > 0, so masked zeros (and the appended one) never win unless no token is real
    r_max = torch.cat([torch.where(mask, ratio, zero).flatten(), zero[None]]).max()
    # one stack, one .tolist(): a single device sync per call
    values = torch.stack([mean(clipped), mean(ratio), r_max, mean(kl), mean(is_w), n.float()])
    clip_frac, r_mean, r_max_f, kl_mean, is_mean, n_tokens = values.tolist()
    return GRPOStats(
        clip_frac=clip_frac,
        ratio_mean=r_mean,
        ratio_max=r_max_f,
        kl_mean=None if kl is None else kl_mean,
        is_weight_mean=None if is_w is None else is_mean,
        n_tokens=int(n_tokens),
    )
