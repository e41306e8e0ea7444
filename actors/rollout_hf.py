"""A rollout engine on transformers + PEFT: batched sampling with a shared-prompt KV cache.

The decode loop (ours, not ``model.generate``)
---------------------------------------------
Rows are ``len(prompts) * n`` completions. Identical prompts are merged, then the distinct
prompts are grouped into chunks whose rows fit ``max_batch_tokens`` (rows x (longest prompt +
max_new_tokens) KV-cache tokens; a group larger than the budget runs alone). Per chunk:

1. Prefill: the distinct prompts, left-padded, run ONCE (``use_cache=True``, position ids from
   the attention mask as ``generate`` makes them, logits of the last position only). The head
   all of a chunk's prompts share (the adapter prompt's system message and few-shot lines,
   ~200 of its ~230 tokens) runs once for the chunk, and only each prompt's own tail runs per
   prompt, padded after the head (what vLLM's automatic prefix caching does across requests).
2. Expand: ``Cache.batch_select_indices(row_src)`` gathers each prompt's keys and values into
   its n rows (transformers' public cache API, also used by its own contrastive search); the
   prefill's last logits and the attention mask are gathered the same way. With
   ``prefix_reuse=False`` every row prefills its own copy instead (kept to test equivalence).
3. Decode: sample one token per active row (float32 logits; greedy when T == 0, else top-k, then
   top-p on ``logits / T``, sampled by the exponential race ``argmax(p / E)`` with
   ``E ~ Exp(1)`` drawn for *every* row of the chunk from a seeded ``torch.Generator``, so a
   row's randomness depends only on the seed, the chunk and the step, not on which other rows
   are still running). Log-probs are ``log_softmax(logits / T)`` at the sampled token (plain
   ``log_softmax`` when greedy), before top-k / top-p -- what the learner computes.
4. A row ends on EOS (kept in ``token_ids``) or when a stop string appears in its decoded text
   (the stop string's tokens are kept: the text is ``decode(token_ids)`` and may run a few
   characters past the stop string when one token straddles it) -> ``"stop"``; at
   ``max_new_tokens`` -> ``"length"``. Ended rows are dropped from the cache
   (``batch_select_indices`` again), so compute shrinks as rows finish.

Weights
-------
The LoRA is PEFT's default init (``lora_B = 0``: the adapter starts as the identity), A drawn
under ``seed``. ``update_adapter`` copies new tensors in place (under ``no_grad``) into the
tensors ``get_peft_model_state_dict`` returns, which share storage with the parameters (checked
at start-up); names and shapes are all validated before anything is copied, and a lock
serialises updates with generate calls, so an update lands between generations, whole.

The vLLM engine (actors/rollout_vllm.py) keeps the same contract; tests/actors/test_engine_contract.py
runs one suite over both.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from actors.lora_tensors import check_lora_tensors, read_adapter
from actors.models import load_causal_lm, load_tokenizer, resolve_model_path
from actors.shared_prefix import left_pad
from rl.records import Completion, FinishReason, Prompt, SamplingParams, shared_head_len


MIN_SHARED_TOKENS = 16
"""A shared prompt head shorter than this is not worth a separate pass."""


@dataclass
class _Row:
    """One completion being decoded."""

    tokens: list[int]
    logprobs: list[float]
    finish: FinishReason | None = None


class HFRolloutEngine:
    """Samples completions from a base model + LoRA adapter (see the module docstring).

    model_path: ``"embedded"`` or a local model folder (its tokenizer is loaded from there);
    target_modules: module names for the LoRA (or ``"all-linear"``); init_adapter: a PEFT adapter
    folder (``adapter_model.safetensors``) or a state dict, loaded as version 0;
    max_batch_tokens: KV-cache budget of one decode chunk; prefix_reuse: prefill each distinct
    prompt once (True) or once per row (False, for tests); load_options: ``attn_implementation``
    and ``trust_remote_code`` for :func:`actors.models.load_causal_lm`.
    """

    def __init__(
        self, model_path: str | os.PathLike[str], *, lora_rank: int, lora_alpha: float,
        lora_dropout: float = 0.0, target_modules: Sequence[str] | str, use_rslora: bool = False,
        init_adapter: str | os.PathLike[str] | dict[str, Tensor] | None = None,
        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
        max_batch_tokens: int = 32768, seed: int = 0, prefix_reuse: bool = True,
        load_options: dict | None = None,
    ) -> None:
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

        path = resolve_model_path(model_path)
        self.device = torch.device(device)
        load_options = load_options or {}
        self.tokenizer = load_tokenizer(path, load_options.get("trust_remote_code", False))
        base = load_causal_lm(path, dtype=dtype, device=self.device, **load_options)
        lora = LoraConfig(
            r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
            target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
            task_type="CAUSAL_LM",
        )
        with torch.random.fork_rng(devices=[]):  # a reproducible lora_A without touching global RNG
            torch.manual_seed(seed)
            self.model = get_peft_model(base, lora).to(self.device).eval()
        self._slots: dict[str, Tensor] = get_peft_model_state_dict(self.model)
        _check_slots_alias_parameters(self._slots, self.model)
        self.eos_ids = _eos_ids(self.tokenizer, base)
        self.pad_id = self.tokenizer.pad_token_id
        self.max_batch_tokens = max_batch_tokens
        self.prefix_reuse = prefix_reuse
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        self._lock = threading.Lock()
        self._version = 0
        if init_adapter is not None:
            self._load(read_adapter(init_adapter))

    # ------------------------------------------------------------------ the RolloutEngine API
    @property
    def policy_version(self) -> int:
        return self._version

    def update_adapter(self, version: int, tensors: dict[str, Tensor]) -> None:
        """Load a full set of LoRA tensors (PEFT state-dict names) and set the version."""
        with self._lock:
            self._load(tensors)
            self._version = version

    def adapter_state(self) -> dict[str, Tensor]:
        """A copy of the LoRA tensors, named as ``update_adapter`` takes them."""
        with self._lock:
            return {k: v.detach().clone() for k, v in self._slots.items()}

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], n: int, sampling: SamplingParams) -> list[Completion]:
        if n < 1 or sampling.max_new_tokens < 1:
            raise ValueError(f"need n >= 1 and max_new_tokens >= 1, got {n}, {sampling.max_new_tokens}")
        if any(not p.token_ids for p in prompts):
            raise ValueError("every prompt needs at least one token")
        with self._lock:
            version = self._version
            gen = self._generator
            if sampling.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(sampling.seed)
            rows: dict[tuple[int, int], _Row] = {}
            for chunk in self._chunks(prompts, n, sampling.max_new_tokens):
                ids = [list(prompts[group[0]].token_ids) for group in chunk]
                keys = [(i, s) for group in chunk for i in group for s in range(n)]
                row_src = [g for g, group in enumerate(chunk) for _ in range(len(group) * n)]
                rows.update(zip(keys, self._decode(ids, row_src, sampling, gen)))
        return [
            Completion(
                prompt_index=i, sample_index=s, token_ids=r.tokens, logprobs=r.logprobs,
                text=self.tokenizer.decode(r.tokens, skip_special_tokens=True),
                finish_reason=r.finish or "length", policy_version=version,
            )
            for (i, s), r in sorted(rows.items())
        ]

    # ------------------------------------------------------------------ internals
    def _chunks(self, prompts: list[Prompt], n: int, max_new: int) -> list[list[list[int]]]:
        """Distinct prompts as groups of prompt indices, packed into chunks under the budget."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(tuple(p.token_ids), []).append(i)
        chunks: list[list[list[int]]] = []
        current: list[list[int]] = []
        rows = longest = 0
        for key, members in groups.items():
            r, ln = rows + len(members) * n, max(longest, len(key))
            if current and r * (ln + max_new) > self.max_batch_tokens:
                chunks.append(current)
                current, r, ln = [], len(members) * n, len(key)
            current.append(members)
            rows, longest = r, ln
        if current:
            chunks.append(current)
        return chunks

    def _decode(
        self, prompts: list[list[int]], row_src: list[int], sp: SamplingParams,
        gen: torch.Generator,
    ) -> list[_Row]:
        dev = self.device
        src = torch.tensor(row_src, device=dev)
        if not self.prefix_reuse:  # every row prefills its own copy of its prompt
            prompts, src = [prompts[g] for g in row_src], torch.arange(len(row_src), device=dev)
        cache, logits, mask, pos = self._prefill(prompts)
        if self.prefix_reuse:
            cache.batch_select_indices(src)
        logits, mask, pos = logits[src], mask[src], pos[src, -1] + 1
        rows = [_Row([], []) for _ in row_src]
        active = list(range(len(rows)))
        stop_window = max((len(s.encode()) for s in sp.stop), default=0) + 2
        for step in range(sp.max_new_tokens):
            noise = None
            if sp.temperature > 0:  # drawn for all rows: reproducible whoever is still running
                noise = torch.empty(len(rows), logits.shape[-1], device=dev)
                noise = noise.exponential_(generator=gen)[active].clamp_(min=1e-30)
            tokens, logprobs = sample(logits, sp.temperature, sp.top_k, sp.top_p, noise)
            for r, tok, lp in zip(active, tokens.tolist(), logprobs.tolist()):
                row = rows[r]
                row.tokens.append(tok)
                row.logprobs.append(lp)
                if tok in self.eos_ids or self._hit_stop(row.tokens, sp.stop, stop_window):
                    row.finish = "stop"
            keep = [j for j, r in enumerate(active) if rows[r].finish is None]
            if not keep or step == sp.max_new_tokens - 1:
                break
            if len(keep) < len(active):  # drop finished rows from the batch and the cache
                idx = torch.tensor(keep, device=dev)
                cache.batch_select_indices(idx)
                mask, pos, tokens = mask[idx], pos[idx], tokens[idx]
                active = [active[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=-1)
            out = self.model(input_ids=tokens[:, None], attention_mask=mask,
                             position_ids=pos[:, None], past_key_values=cache, use_cache=True)
            logits, pos = out.logits[:, -1], pos + 1
        for row in rows:
            row.finish = row.finish or "length"
        return rows

    def _prefill(self, prompts: list[list[int]]) -> tuple[Any, Tensor, Tensor, Tensor]:
        """Run the prompts once: ``(cache, last logits [B, V], attention mask, position ids)``.

        The tokens every prompt starts with (the system prompt and few-shot header of a chunk of
        different questions) are computed once and their keys and values copied to every
        prompt; only the rest runs per prompt, left-padded *after* the shared part (masked out,
        positions continuing from the shared part). With prefix reuse off, or under
        ``MIN_SHARED_TOKENS`` shared tokens, all of every prompt runs.
        """
        dev = self.device
        shared = shared_head_len(prompts) if self.prefix_reuse else 0
        head = None
        if shared >= MIN_SHARED_TOKENS and len(prompts) > 1:
            head = self.model(input_ids=torch.tensor([prompts[0][:shared]], device=dev),
                              use_cache=True, logits_to_keep=1).past_key_values
            head.batch_select_indices(torch.zeros(len(prompts), dtype=torch.long, device=dev))
            prompts = [p[shared:] for p in prompts]
        ids, mask = left_pad(prompts, self.pad_id, dev)
        if head is not None:
            mask = torch.cat([mask.new_ones(len(prompts), shared), mask], dim=-1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos[:, pos.shape[1] - ids.shape[1]:],
                         past_key_values=head, use_cache=True, logits_to_keep=1)
        return out.past_key_values, out.logits[:, -1], mask, pos

    def _hit_stop(self, tokens: list[int], stops: tuple[str, ...], window: int) -> bool:
        # A stop string of b UTF-8 bytes spans at most b tokens (plus a partial one either side).
        if not stops:
            return False
        tail = self.tokenizer.decode(tokens[-window:], skip_special_tokens=True)
        return any(s in tail for s in stops)

    def _load(self, tensors: dict[str, Tensor]) -> None:
        check_lora_tensors({k: tuple(v.shape) for k, v in self._slots.items()}, tensors)
        with torch.no_grad():
            for k, v in tensors.items():
                self._slots[k].copy_(v)


# ---------------------------------------------------------------------------- pure helpers


def sample(
    logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One token per row from ``logits`` [R, V]; returns (tokens [R], logprobs [R] float32).

    Greedy (argmax, log-prob under ``log_softmax(logits)``) when ``temperature == 0``; else the
    exponential race over the top-k / top-p filtered ``softmax(logits / T)`` with ``noise``
    [R, V] ~ Exp(1), log-prob under the unfiltered ``log_softmax(logits / T)``.
    """
    logits = logits.float()
    if temperature == 0:
        logp = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
    else:
        if noise is None:
            raise ValueError("sampling with temperature > 0 needs Exp(1) noise")
        logp = torch.log_softmax(logits / temperature, dim=-1)
        filtered = filter_top_k_top_p(logp, top_k, top_p)
        tokens = (filtered - noise.log()).argmax(dim=-1)  # argmax p / E  ~  softmax(filtered)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def filter_top_k_top_p(logp: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """``logp`` [R, V] with tokens outside the top k and outside the nucleus set to -inf
    (top-k first, as vLLM and HF apply them; the most likely token always survives)."""
    if 0 < top_k < logp.shape[-1]:
        kth = logp.topk(top_k, dim=-1).values[:, -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_logp, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above
        drop_sorted = before > top_p
        drop_sorted[:, 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logp = logp.masked_fill(drop, float("-inf"))
    return logp


def _eos_ids(tokenizer: Any, model: Any) -> frozenset[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return frozenset(ids)


def _check_slots_alias_parameters(slots: dict[str, Tensor], model: Any) -> None:
    """update_adapter writes into the state dict's tensors; they must be the parameters'."""
    params = {p.data_ptr() for n, p in model.named_parameters() if "lora_" in n}
    if not slots or any(t.data_ptr() not in params for t in slots.values()):
        raise RuntimeError("peft.get_peft_model_state_dict no longer returns views of the LoRA "
                           "parameters (a PEFT change?): update_adapter cannot copy in place")

