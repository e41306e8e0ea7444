"""Completion logits for prompt groups: the prompt computed once per group, or the plain way.

A GRPO group is one prompt and its G completions. The learner needs, for every completion
token, the logits that predict it: the prompt's last position predicts the first completion
token, completion position t predicts token t + 1. The completions' last tokens predict
nothing we score, so they are never fed in.

Shared prefix (:func:`shared_prefix_logits`). The prompts of a micro-batch (N rows, left-padded
so that every prompt ends in the last column and ``logits_to_keep=1`` gives the logits of its
first completion token) run once with ``use_cache=True``; each layer's keys and values are then
given to the B completion rows -- ``expand`` (a view) when there is one prompt, ``index_select``
when several -- so the backward pass sums the G continuations' gradients into the one prompt
computation. The continuations (right-padded, a 2D attention mask over prompt + continuation
that hides the prompt's padding, explicit position ids ``P_n + t``) run on that cache. Every
call builds a fresh cache for the continuations: the forward appends to it, and the prompt's
own cache (whose tensors keep their graph) must stay as it was. Equal to the plain pass up to
float rounding (tests/actors/test_shared_prefix.py); a G=8, prompt 165, completion 5 forward +
backward of SmolLM2-135M is ~5x cheaper on CPU.

Plain (:func:`plain_logits`): B rows of prompt (left-padded) + completion (right-padded), so the
positions that predict completion tokens are the last Cmax columns of every row and an int
``logits_to_keep`` sends only those through the LM head.

Both paths left-pad the prompts (as TRL's GRPO trainer does) rather than pick positions per row
with a [B, T] ``logits_to_keep`` index tensor: transformers 5.19 and 5.20 do not accept one, and
an int keeps the model's own forward (LM head, any logit scaling) and PEFT's in charge. Position
ids count real tokens only, so the padding changes no logit.

Packing (:func:`pack_micro_batches`): a group is the unit of a micro-batch, since its prompt
pass serves all its completions; units are added in order while the micro-batch's tokens fed to
the model (:func:`batch_cost`, padding included) stay within the budget, and a group over the
budget is cut into slices of its completions, each with its own prompt pass.

Limits: the shared-prefix path supports caches made of full-attention ``DynamicLayer`` s (Llama,
Qwen2/3 without sliding windows, ...); other layer types raise ``NotImplementedError``. Under
gradient checkpointing transformers drops the KV cache in training mode, so the learner uses
the plain path then.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer

from rl.records import TrainGroup


@dataclass(frozen=True)
class RowBatch:
    """Rows of one micro-batch, as tensors on the model's device.

    prompts: N distinct prompts; row_prompt: [B] which prompt each completion row continues;
    completions: B token lists (each >= 1 token).
    """

    prompts: tuple[tuple[int, ...], ...]
    row_prompt: tuple[int, ...]
    completions: tuple[tuple[int, ...], ...]

    @staticmethod
    def build(prompts: Sequence[Sequence[int]], row_prompt: Sequence[int],
              completions: Sequence[Sequence[int]]) -> "RowBatch":
        if len(row_prompt) != len(completions):
            raise ValueError(f"{len(row_prompt)} row prompts for {len(completions)} completions")
        if any(len(p) == 0 for p in prompts) or any(len(c) == 0 for c in completions):
            raise ValueError("prompts and completions need at least one token each")
        if any(not 0 <= i < len(prompts) for i in row_prompt):
            raise ValueError(f"row_prompt {list(row_prompt)} out of range for {len(prompts)} "
                             "prompts")
        return RowBatch(tuple(map(tuple, prompts)), tuple(row_prompt),
                        tuple(map(tuple, completions)))

    @property
    def max_completion(self) -> int:
        return max(len(c) for c in self.completions)

    def completion_tokens(self, device: Any, pad_id: int) -> tuple[Tensor, Tensor]:
        """tokens [B, Cmax] right-padded with pad_id, lengths [B]."""
        return (_right_pad(self.completions, pad_id, device),
                torch.tensor([len(c) for c in self.completions], device=device))


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int, device: Any, width: int = 0) -> Tensor:
    width = max([width, *map(len, rows)])
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device)


def _length_mask(lengths: Tensor, width: int) -> Tensor:
    return (torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]).long()


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[Tensor, Tensor]:
    """ids [N, W] left-padded with pad_id, and their attention mask [N, W]."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _continuations(batch: RowBatch, pad_id: int, device: Any) -> tuple[Tensor, Tensor]:
    """Every completion without its last token, right-padded: ids and mask [B, Cmax - 1]."""
    width = batch.max_completion - 1
    lengths = torch.tensor([len(c) - 1 for c in batch.completions], device=device)
    return (_right_pad([c[:-1] for c in batch.completions], pad_id, device, width=width),
            _length_mask(lengths, width))


def _positions(mask: Tensor) -> Tensor:
    """Position ids counting a row's real tokens from 0, as ``generate`` makes them; padding
    gets a neighbour's position (its output is never read)."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def expand_cache(cache: DynamicCache, rows: Tensor | int) -> DynamicCache:
    """A new cache whose layer k/v are the prompt cache's, given to each completion row.

    rows: an int G (one prompt row shared by G rows: ``expand``, no copy) or a LongTensor [B]
    of prompt-row indices (``index_select``). The prompt cache is left untouched; the tensors
    keep their autograd graph, so gradients from all rows sum into the prompt's computation.
    """
    new = copy.copy(cache)
    new.layers = []
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(
                f"shared-prefix compute supports full-attention DynamicLayer caches, not "
                f"{type(layer).__name__}; use the plain path for this model")
        fresh = copy.copy(layer)  # a shallow copy: update() rebinds keys/values, never writes
        if isinstance(rows, int):
            if layer.keys.shape[0] != 1:
                raise ValueError(f"expanding needs a one-row cache, got {layer.keys.shape[0]} rows")
            fresh.keys = layer.keys.expand(rows, -1, -1, -1)
            fresh.values = layer.values.expand(rows, -1, -1, -1)
        else:
            fresh.keys = layer.keys.index_select(0, rows)
            fresh.values = layer.values.index_select(0, rows)
        new.layers.append(fresh)
    return new


def shared_prefix_logits(model: Any, batch: RowBatch, pad_id: int) -> Tensor:
    """Logits [B, Cmax, V] predicting each completion token, the prompts computed once.

    model: a causal LM (a PEFT model is fine) whose forward takes ``attention_mask``,
    ``position_ids``, ``past_key_values``, ``use_cache`` and ``logits_to_keep``.
    """
    device = model.device if hasattr(model, "device") else next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(batch.prompts, pad_id, device)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask,
                position_ids=_positions(prompt_mask), use_cache=True, logits_to_keep=1)
    rows = torch.tensor(batch.row_prompt, device=device)
    one_prompt = len(batch.prompts) == 1
    first = (out.logits.expand(len(rows), -1, -1) if one_prompt
             else out.logits.index_select(0, rows))  # [B, 1, V]
    c_max = batch.max_completion
    if c_max == 1:
        return first
    cont, cont_mask = _continuations(batch, pad_id, device)
    mask = torch.cat([prompt_mask.index_select(0, rows), cont_mask], 1)
    prompt_len = prompt_mask.sum(1).index_select(0, rows)
    positions = prompt_len[:, None] + torch.arange(c_max - 1, device=device)
    cache = expand_cache(out.past_key_values, len(rows) if one_prompt else rows)
    rest = model(input_ids=cont, attention_mask=mask, position_ids=positions,
                 past_key_values=cache, use_cache=True).logits  # [B, Cmax - 1, V]
    return torch.cat([first, rest], dim=1)


def plain_logits(model: Any, batch: RowBatch, pad_id: int) -> Tensor:
    """Logits [B, Cmax, V] predicting each completion token: one row per prompt + completion."""
    device = model.device if hasattr(model, "device") else next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad([batch.prompts[p] for p in batch.row_prompt], pad_id,
                                        device)
    cont, cont_mask = _continuations(batch, pad_id, device)
    mask = torch.cat([prompt_mask, cont_mask], 1)
    # The last Cmax columns: the prompt's last token, then the completion's (padding past a
    # shorter completion's end, never read).
    out = model(input_ids=torch.cat([prompt_ids, cont], 1), attention_mask=mask,
                position_ids=_positions(mask), use_cache=False,
                logits_to_keep=batch.max_completion)
    return out.logits


def completion_logits(model: Any, batch: RowBatch, pad_id: int,
                      shared_prefix: bool = True) -> Tensor:
    """:func:`shared_prefix_logits` or :func:`plain_logits`."""
    fn = shared_prefix_logits if shared_prefix else plain_logits
    return fn(model, batch, pad_id)


# --------------------------------------------------------------------------------------------
# Packing groups into micro-batches


@dataclass(frozen=True)
class Unit:
    """A group, or a slice of its completions: what shares one prompt pass."""

    prompt: tuple[int, ...]
    completions: tuple[tuple[int, ...], ...]
    advantages: tuple[float, ...]
    rollout_logprobs: tuple[tuple[float, ...], ...]
    truncated: tuple[bool, ...]
    context: tuple[int, ...]


def batch_cost(units: Sequence[Unit], shared_prefix: bool) -> int:
    """Tokens fed to the model for these units in one micro-batch, padding included."""
    p_max = max(len(u.prompt) for u in units)
    c_max = max(len(c) for u in units for c in u.completions)
    rows = sum(len(u.completions) for u in units)
    if shared_prefix:  # prompts once each, then every completion minus its last token
        return len(units) * p_max + rows * (c_max - 1)
    return rows * (p_max + c_max - 1)


def split_group(group: TrainGroup, budget: int, shared_prefix: bool) -> list[Unit]:
    """The group as one unit, or sliced into as few units as fit the budget (>= 1 row each)."""
    n = len(group.completions)
    rollout = group.rollout_logprobs or [[] for _ in range(n)]  # none: no TIS possible
    context = group.context or [0] * n
    if not n == len(group.advantages) == len(group.truncated) == len(rollout) == len(context):
        raise ValueError("a TrainGroup needs one advantage, truncated flag, rollout log-prob "
                         "list (and context count, if any) per completion")
    if any(not 0 <= k < len(c) for k, c in zip(context, group.completions)):
        raise ValueError("a completion's context must leave at least one token to train on")
    whole = Unit(tuple(group.prompt_ids), tuple(map(tuple, group.completions)),
                 tuple(group.advantages), tuple(map(tuple, rollout)), tuple(group.truncated),
                 tuple(context))
    size = n
    while size > 1 and batch_cost([_slice(whole, 0, size)], shared_prefix) > budget:
        size -= 1
    return [_slice(whole, i, i + size) for i in range(0, n, size)]


def _slice(u: Unit, a: int, b: int) -> Unit:
    return Unit(u.prompt, u.completions[a:b], u.advantages[a:b], u.rollout_logprobs[a:b],
                u.truncated[a:b], u.context[a:b])


def pack_micro_batches(groups: Sequence[TrainGroup], budget: int,
                       shared_prefix: bool = True) -> list[list[Unit]]:
    """Greedy, in order: add units to the current micro-batch while it stays within budget."""
    batches: list[list[Unit]] = []
    for group in groups:
        for unit in split_group(group, budget, shared_prefix):
            if batches and batch_cost(batches[-1] + [unit], shared_prefix) <= budget:
                batches[-1].append(unit)
            else:
                batches.append([unit])
    return batches
