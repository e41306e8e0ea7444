"""Each function of rl/grpo.py against a plain-Python-loop version on random inputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rl import grpo

SHAPES = [(1, 1), (3, 7), (5, 2), (8, 13)]  # (B, T)
CLIP = grpo.LOG_RATIO_CLAMP


def rand_lengths(B: int, T: int, g: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T  # at least one full row; others may be empty
    if B > 2:
        lengths[1] = 0
    return lengths


def loop_mask(lengths, T):
    return torch.tensor([[t < int(n) for t in range(T)] for n in lengths], dtype=torch.bool)


def gen(seed: int = 0) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------- plain-loop references
def loop_logprob(z_row, tok, temperature=1.0):
    z = [float(v) / temperature for v in z_row]
    m = max(z)
    return z[tok] - (m + math.log(sum(math.exp(v - m) for v in z)))


def loop_entropy(z_row):
    z = [float(v) for v in z_row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return -sum(math.exp(v - lse) * (v - lse) for v in z)


def loop_surrogate(lp, old, adv, eps_low, eps_high, w=1.0):
    r = math.exp(min(max(lp - old, -CLIP), CLIP))
    rc = min(max(r, 1 - eps_low), 1 + eps_high)
    loss = -min(r * adv, rc * adv) * w
    clipped = (adv > 0 and r > 1 + eps_high) or (adv < 0 and r < 1 - eps_low)
    return loss, clipped


def loop_k3(lp, ref):
    d = min(max(ref - lp, -CLIP), CLIP)
    return math.exp(d) - d - 1


def loop_aggregate(loss, mask, mode, const=None):
    B, T = len(loss), len(loss[0]) if loss else 0
    rows = [[loss[b][t] for t in range(T) if mask[b][t]] for b in range(B)]
    if mode == "token_mean":
        n = sum(len(r) for r in rows)
        return sum(sum(r) for r in rows) / n if n else 0.0
    if mode == "sequence_mean":
        means = [sum(r) / len(r) for r in rows if r]
        return sum(means) / len(means) if means else 0.0
    return sum(sum(r) for r in rows) / (B * const)


# ----------------------------------------------------------------------- log-probs, entropy
@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_rows", [3, 4096])
def test_token_logprobs_matches_loop(B, T, temperature, chunk_rows):
    g, V = gen(B * T), 11
    logits = torch.randn(B, T, V, generator=g) * 3
    tokens = torch.randint(0, V, (B, T), generator=g)
    got = grpo.token_logprobs(logits, tokens, temperature, chunk_rows=chunk_rows)
    want = [[loop_logprob(logits[b, t], int(tokens[b, t]), temperature) for t in range(T)]
            for b in range(B)]
    assert got.dtype == torch.float32 and got.shape == (B, T)
    assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)


def test_token_logprobs_upcasts_bf16():
    g, V = gen(1), 50
    logits = (torch.randn(4, 6, V, generator=g) * 5).to(torch.bfloat16)
    tokens = torch.randint(0, V, (4, 6), generator=g)
    got = grpo.token_logprobs(logits, tokens, chunk_rows=5)
    assert got.dtype == torch.float32
    # float32 math on the exact bf16 values, not bf16 math (which is off by ~1e-2)
    want = [[loop_logprob(logits[b, t], int(tokens[b, t])) for t in range(6)] for b in range(4)]
    assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)
    bf16_math = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1).float()
    assert (got - bf16_math).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_gradient_matches_plain_log_softmax(dtype):
    g, V = gen(2), 17
    base = torch.randn(3, 5, V, generator=g).to(dtype)
    tokens = torch.randint(0, V, (3, 5), generator=g)
    weights = torch.randn(3, 5, generator=g)
    a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
    (grpo.token_logprobs(a, tokens, 0.8, chunk_rows=4) * weights).sum().backward()
    plain = torch.log_softmax(b.float() / 0.8, -1).gather(-1, tokens[..., None]).squeeze(-1)
    (plain * weights).sum().backward()
    assert a.grad.dtype == dtype
    assert_close(a.grad, b.grad)


def test_token_logprobs_rejects_bad_input():
    with pytest.raises(ValueError, match="do not match"):
        grpo.token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        grpo.token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), 0.0)


@pytest.mark.parametrize("B,T", SHAPES)
def test_entropy_matches_loop(B, T):
    logits = (torch.randn(B, T, 9, generator=gen(B)) * 2).to(torch.bfloat16)
    got = grpo.entropy_from_logits(logits, chunk_rows=4)
    want = [[loop_entropy(logits[b, t]) for t in range(T)] for b in range(B)]
    assert got.dtype == torch.float32
    assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------- advantages and groups
def loop_advantages(rewards, G, scale, eps=1e-6):
    out = []
    for i in range(0, len(rewards), G):
        grp = rewards[i : i + G]
        m = sum(grp) / G
        std = math.sqrt(sum((r - m) ** 2 for r in grp) / G)  # population std
        out += [(r - m) / (std + eps) if scale == "std" else r - m for r in grp]
    return out


@pytest.mark.parametrize("N,G", [(1, 1), (1, 2), (4, 8), (6, 3)])
@pytest.mark.parametrize("scale", ["std", "none"])
@pytest.mark.parametrize("binary", [True, False])
def test_group_advantages_match_loop(N, G, scale, binary):
    g = gen(N * G)
    rewards = torch.randint(0, 2, (N * G,), generator=g).float() if binary else torch.rand(N * G)
    want = torch.tensor(loop_advantages(rewards.tolist(), G, scale))
    assert_close(grpo.group_advantages(rewards, G, scale), want)
    assert_close(grpo.group_advantages(rewards.view(N, G), G, scale), want.view(N, G))


def test_advantages_zero_for_zero_variance_groups():
    rewards = torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0], [0.5, 0.5, 0.5, 0.5]])
    adv = grpo.group_advantages(rewards, 4)
    flat = grpo.zero_variance_groups(rewards, 4)
    assert flat.tolist() == [True, True, False, True]
    assert (adv[flat] == 0).all() and (adv[~flat] != 0).all()
    s = math.sqrt(3)  # one success in four: mean 1/4, population std sqrt(3)/4
    assert_close(adv[2], torch.tensor([-1 / s, s, -1 / s, -1 / s]))


def test_zero_variance_groups_match_loop():
    rewards = torch.randint(0, 2, (40, 3), generator=gen(3)).float()
    want = [all(r == grp[0] for r in grp) for grp in rewards.tolist()]
    assert grpo.zero_variance_groups(rewards.flatten(), 3).tolist() == want


def test_group_functions_reject_bad_input():
    with pytest.raises(ValueError, match=r"'mean'.*\('std', 'none'\)"):
        grpo.group_advantages(torch.zeros(4), 2, "mean")
    with pytest.raises(ValueError, match="groups of 3"):
        grpo.group_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match=r"not \[N, 2\]"):
        grpo.zero_variance_groups(torch.zeros(2, 4), 2)


def test_select_informative_groups_drops_counts_and_asks_for_more():
    groups = [[1, 1], [0, 1], [0, 0], [1, 0], [0.5, 0.5]]
    sel = grpo.select_informative_groups(groups, 3, refill_rounds=0, max_refill_rounds=2)
    assert sel.kept == [1, 3] and sel.dropped == [0, 2, 4]
    assert (sel.missing, sel.surplus, sel.need_more, sel.exhausted) == (1, 0, True, False)
    # the flags agree with the tensor version
    zv = grpo.zero_variance_groups(torch.tensor(groups[:4], dtype=torch.float), 2)
    assert [i for i in range(4) if zv[i]] == [0, 2]


def test_select_informative_groups_caps_at_target_and_respects_bound():
    full = grpo.select_informative_groups([[0, 1]] * 5, 3, 0, 0)
    assert full.kept == [0, 1, 2] and full.surplus == 2
    assert not full.need_more and not full.exhausted
    out = grpo.select_informative_groups([[1, 1, 1], [0, 1, 1]], 4, 2, max_refill_rounds=2)
    assert (out.kept, out.missing, out.need_more, out.exhausted) == ([1], 3, False, True)
    none = grpo.select_informative_groups([], 2, 0, 0)
    assert none.kept == [] and none.exhausted
    with pytest.raises(ValueError):
        grpo.select_informative_groups([[]], 1, 0, 1)


@pytest.mark.parametrize("seed", range(5))
def test_select_informative_groups_drives_a_refill_loop(seed):
    g = gen(seed)
    groups, rounds, target, bound = [], 0, 6, 3
    request = target
    while True:  # the trainer's loop: generate, decide, refill while asked
        groups += torch.randint(0, 2, (request, 4), generator=g).tolist()
        sel = grpo.select_informative_groups(groups, target, rounds, bound)
        if not sel.need_more:
            break
        rounds, request = rounds + 1, sel.missing
    assert rounds <= bound
    assert len(sel.kept) + sel.missing == target
    assert len(sel.kept) + sel.surplus + len(sel.dropped) == len(groups)
    assert all(len(set(groups[i])) > 1 for i in sel.kept)
    assert all(len(set(groups[i])) == 1 for i in sel.dropped)
    assert sel.exhausted == (sel.missing > 0)


# ----------------------------------------------------------------------- per-token terms
def rand_logps(B, T, g, spread=0.3):
    old = -torch.rand(B, T, generator=g) * 4
    return old + torch.randn(B, T, generator=g) * spread, old


@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.2, 0.28), (0.0, 0.0)])
@pytest.mark.parametrize("with_is", [False, True])
def test_clipped_surrogate_matches_loop(B, T, eps_low, eps_high, with_is):
    g = gen(B * T)
    logp, old = rand_logps(B, T, g)
    adv = torch.randn(B, generator=g)
    w = torch.rand(B, T, generator=g) * 2 if with_is else None
    loss, clipped = grpo.clipped_surrogate(logp, old, adv, eps_low, eps_high, w)
    ref = [
        [
            loop_surrogate(float(logp[b, t]), float(old[b, t]), float(adv[b]), eps_low, eps_high,
                           1.0 if w is None else float(w[b, t]))
            for t in range(T)
        ]
        for b in range(B)
    ]
    assert_close(loss, torch.tensor([[x[0] for x in row] for row in ref]))
    assert clipped.tolist() == [[x[1] for x in row] for row in ref]


def test_clipped_surrogate_gradient_zero_only_where_clipped():
    ratios = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5])
    old = torch.full((2, 5), -1.0)
    logp = (old + ratios.log()).requires_grad_()
    adv = torch.tensor([1.0, -1.0])
    loss, clipped = grpo.clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.28)
    loss.sum().backward()
    # A > 0 clips only a ratio above 1 + eps_high; A < 0 only one below 1 - eps_low
    assert clipped.tolist() == [[False] * 4 + [True], [True] + [False] * 4]
    assert (logp.grad[clipped] == 0).all()
    assert_close(logp.grad[~clipped], (-adv[:, None] * ratios)[~clipped])  # d(-rA)/dlogp = -rA


@pytest.mark.parametrize("B,T", SHAPES)
def test_kl_k3_matches_loop_and_is_nonnegative(B, T):
    g = gen(B + T)
    logp, ref = rand_logps(B, T, g, spread=2.0)
    got = grpo.kl_k3(logp, ref)
    want = [[loop_k3(float(logp[b, t]), float(ref[b, t])) for t in range(T)] for b in range(B)]
    assert_close(got, torch.tensor(want))
    assert (got >= 0).all()
    assert (grpo.kl_k3(logp, logp) == 0).all()


def test_kl_k3_finite_at_extremes():
    logp = torch.tensor([[-1e4, 0.0, -50.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -1e4, -50.0]])
    kl = grpo.kl_k3(logp, ref)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(logp.grad).all() and kl[0, 2] == 0


@pytest.mark.parametrize("cap", [1.0, 2.0, 5.0])
def test_truncated_is_weight_matches_loop(cap):
    g = gen(4)
    old, rollout = rand_logps(6, 9, g, spread=1.0)
    o, r = old.tolist(), rollout.tolist()
    want = [[min(math.exp(o[b][t] - r[b][t]), cap) for t in range(9)] for b in range(6)]
    w = grpo.truncated_is_weight(old.requires_grad_(), rollout, cap)
    assert_close(w, torch.tensor(want))
    assert not w.requires_grad and (w <= cap).all()
    with pytest.raises(ValueError, match="cap"):
        grpo.truncated_is_weight(old, rollout, 0.0)


@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("mask_truncated", [False, True])
def test_completion_mask_matches_loop(B, T, mask_truncated):
    g = gen(B * T + 1)
    lengths = rand_lengths(B, T, g)
    truncated = torch.rand(B, generator=g) < 0.5
    got = grpo.completion_mask(lengths, T, truncated, mask_truncated)
    dropped = [mask_truncated and bool(truncated[b]) for b in range(B)]
    want = [[t < int(lengths[b]) and not dropped[b] for t in range(T)] for b in range(B)]
    assert got.dtype == torch.bool and got.tolist() == want
    with pytest.raises(ValueError, match="truncated"):
        grpo.completion_mask(lengths, T, None, mask_truncated=True)


# ----------------------------------------------------------------------- aggregation and loss
@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "constant"])
def test_aggregate_matches_loop(B, T, mode):
    g = gen(B * T + 2)
    loss = torch.randn(B, T, generator=g)
    mask = loop_mask(rand_lengths(B, T, g), T)
    got = grpo.aggregate(loss, mask, mode, constant_normaliser=T + 3)
    assert_close(got, torch.tensor(loop_aggregate(loss.tolist(), mask.tolist(), mode, T + 3)))


@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "constant"])
def test_aggregate_all_masked_is_zero_with_grad_and_ignores_padding(mode):
    loss = torch.randn(3, 4, requires_grad=True)
    out = grpo.aggregate(loss, torch.zeros(3, 4, dtype=torch.bool), mode, 4)
    out.backward()
    assert out.item() == 0.0 and out.requires_grad and (loss.grad == 0).all()
    padded = torch.tensor([[1.0, float("inf")], [2.0, float("nan")]])
    mask = torch.tensor([[True, False], [True, False]])
    assert torch.isfinite(grpo.aggregate(padded, mask, mode, 2))


def test_aggregate_rejects_bad_mode_and_normaliser():
    with pytest.raises(ValueError, match=r"'sum'.*'token_mean', 'sequence_mean', 'constant'"):
        grpo.aggregate(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), "sum")
    with pytest.raises(ValueError, match="constant_normaliser"):
        grpo.aggregate(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), "constant")


CONFIGS = {  # the named variants, plus GRPO with a TIS correction
    "grpo": dict(agg="sequence_mean", kl_coef=0.04, eps_high=0.2),
    "dapo": dict(agg="token_mean", kl_coef=0.0, eps_high=0.28),
    "dr_grpo": dict(agg="constant", kl_coef=0.0, eps_high=0.2, constant_normaliser=16),
    "grpo_tis": dict(agg="sequence_mean", kl_coef=0.1, eps_high=0.28, tis=True),
}


@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("name", CONFIGS)
def test_grpo_loss_matches_loop(B, T, name):
    cfg = dict(CONFIGS[name])
    tis = cfg.pop("tis", False)
    g = gen(B * T + 5)
    logp, old = rand_logps(B, T, g)
    ref = old + torch.randn(B, T, generator=g) * 0.5
    rollout = old + torch.randn(B, T, generator=g) * 0.5 if tis else None
    adv, mask = torch.randn(B, generator=g), loop_mask(rand_lengths(B, T, g), T)
    loss, stats = grpo.grpo_loss(
        logp.requires_grad_(), old, adv, mask, ref_logp=ref, rollout_logp=rollout, **cfg
    )
    logp_v = logp.detach()

    per_tok, real = [], []  # real: (clipped, ratio, kl, w) of each unmasked token
    for b in range(B):
        row = []
        for t in range(T):
            lp, o = float(logp_v[b, t]), float(old[b, t])
            w = 1.0 if rollout is None else min(math.exp(o - float(rollout[b, t])), 2.0)
            surr, c = loop_surrogate(lp, o, float(adv[b]), 0.2, cfg["eps_high"], w)
            kl = loop_k3(lp, float(ref[b, t]))
            row.append(surr + cfg["kl_coef"] * kl)
            if mask[b, t]:
                real.append((c, math.exp(lp - o), kl, w))
        per_tok.append(row)
    want = loop_aggregate(per_tok, mask.tolist(), cfg["agg"], cfg.get("constant_normaliser"))
    assert_close(loss, torch.tensor(want))

    clipped, ratios, kls, ws = zip(*real) if real else ((), (), (), ())
    n = len(real)
    assert stats.n_tokens == n
    assert stats.clip_frac == pytest.approx(sum(clipped) / n if n else 0.0)
    assert stats.ratio_mean == pytest.approx(sum(ratios) / n if n else 0.0, rel=1e-5)
    assert stats.ratio_max == pytest.approx(max(ratios, default=0.0), rel=1e-5)
    if cfg["kl_coef"]:
        assert stats.kl_mean == pytest.approx(sum(kls) / n if n else 0.0, rel=1e-4, abs=1e-7)
    else:
        assert stats.kl_mean is None
    want_w = pytest.approx(sum(ws) / n if n else 0.0, rel=1e-5) if tis else None
    assert stats.is_weight_mean == want_w

    loss.backward()
    assert torch.isfinite(logp.grad).all() and (logp.grad[~mask] == 0).all()


def test_grpo_loss_end_to_end_from_bf16_logits():
    g, V = gen(7), 32
    logits = (torch.randn(4, 6, V, generator=g) * 2).to(torch.bfloat16).requires_grad_()
    tokens = torch.randint(0, V, (4, 6), generator=g)
    truncated = torch.tensor([False, False, False, True])
    mask = grpo.completion_mask(torch.tensor([6, 3, 0, 5]), 6, truncated, mask_truncated=True)
    logp = grpo.token_logprobs(logits, tokens, chunk_rows=5)
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), 2)
    loss, stats = grpo.grpo_loss(logp, logp.detach(), adv, mask, agg="sequence_mean")
    loss.backward()
    assert torch.isfinite(logits.grad.float()).all() and logits.grad.abs().sum() > 0
    assert stats.n_tokens == 9 and stats.ratio_mean == pytest.approx(1.0) and stats.clip_frac == 0.0


def test_grpo_loss_kl_needs_reference_and_empty_batch_stats():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.grpo_loss(z, z, torch.zeros(2), z.bool(), kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        grpo.grpo_loss(z, z, torch.zeros(2), z.bool(), kl_coef=-1.0)
    loss, stats = grpo.grpo_loss(
        z, z, torch.ones(2), z.bool(), ref_logp=z, rollout_logp=z, kl_coef=0.1
    )
    assert loss.item() == 0.0 and stats == grpo.GRPOStats(0.0, 0.0, 0.0, 0.0, 0.0, 0)
