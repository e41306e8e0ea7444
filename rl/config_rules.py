"""The config's cross-field rules: what no single key's range can say (``rl/config.py`` holds
the keys). Each rule yields ``(dotted key, value, problem, what is allowed)``; :func:`check`
raises one :class:`rl.config_schema.ConfigError` listing every rule the config breaks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from rl.config_schema import ConfigError, Issue
from rl.interfaces import vllm_logprobs_mode
from rl.storage import is_remote

if TYPE_CHECKING:
    from rl.config import Config


def _vllm_rules(c: Config) -> Iterable[tuple[str, object, str, str]]:
    """vLLM-only knobs need engine vllm; vLLM's log-probs must be what the learner computes."""
    r = c.rollout
    if r.engine != "vllm":
        for key, value, default in (("vllm_kv_cache_gib", r.vllm_kv_cache_gib, None),
                                    ("vllm_adapter_mode", r.vllm_adapter_mode, "lora")):
            if value != default:
                yield f"rollout.{key}", value, "only the vllm engine reads it", f"{default} with engine hf"
        return
    # One engine reports one kind of log-prob: every sampled phase must need the rollout's.
    temperatures = [("rollout.temperature", r.temperature)] + [
        (f"curriculum[{i}].temperature", s.temperature) for i, s in enumerate(c.curriculum)
        if s.temperature is not None]
    mode = None
    for key, t in temperatures:
        try:
            wanted = vllm_logprobs_mode(t, r.top_k, r.top_p)
        except ValueError as error:
            yield key, t, str(error).split(";")[0], "1.0, or rollout.top_k 0 and top_p 1, or engine hf"
            continue
        mode = mode or wanted
        if wanted != mode:
            yield key, t, f"needs vLLM log-probs {wanted}, the rollout's are {mode}", "rollout.temperature's kind"
    if mode == "raw_logprobs" and c.eval.temperature not in (0.0, 1.0):
        yield ("eval.temperature", c.eval.temperature, "the vLLM engine reports raw log-probs (top-k/top-p at "
               "temperature 1)", "0 or 1 with engine vllm and top_k/top_p")


def _rules(c: Config) -> Iterable[tuple[str, object, str, str]]:
    """(key, value, problem, allowed) for every cross-field rule ``c`` breaks."""
    r, cl, lr = c.rollout, c.cluster, c.learner
    for key, x in (("cluster.learner_gpus", cl.learner_gpus),
                   ("cluster.rollout_gpus_per_engine", cl.rollout_gpus_per_engine)):
        if x > 1 and not float(x).is_integer():
            yield key, x, "a GPU count above 1 must be whole", "a fraction <= 1 or a whole number"
    yield from _vllm_rules(c)
    if r.gpu_memory_utilization is not None:
        if r.engine != "vllm" or cl.rollout_gpus_per_engine == 0:
            yield ("rollout.gpu_memory_utilization", r.gpu_memory_utilization,
                   "only vLLM on a GPU takes a memory fraction",
                   "null (on CPU, rollout.vllm_kv_cache_gib sizes vLLM's KV cache)")
        elif 0 < cl.rollout_gpus_per_engine < 1 and r.gpu_memory_utilization > cl.rollout_gpus_per_engine:
            yield ("rollout.gpu_memory_utilization", r.gpu_memory_utilization,
                   "exceeds the engine's share of its card",
                   f"<= cluster.rollout_gpus_per_engine ({cl.rollout_gpus_per_engine})")
    if lr.micro_batch_tokens < r.max_prompt_tokens + r.max_new_tokens:
        yield ("learner.micro_batch_tokens", lr.micro_batch_tokens, "one full sequence must fit",
               f">= rollout.max_prompt_tokens + rollout.max_new_tokens ({r.max_prompt_tokens + r.max_new_tokens})")
    if lr.optimizer == "adamw_8bit" and cl.learner_gpus == 0:
        yield "learner.optimizer", lr.optimizer, "8-bit AdamW needs CUDA", "adamw, or cluster.learner_gpus > 0"
    if c.algorithm.max_refill_rounds and not c.algorithm.filter_zero_variance:
        yield ("algorithm.max_refill_rounds", c.algorithm.max_refill_rounds, "refills only follow filtering",
               "0, or algorithm.filter_zero_variance true")
    yield from _sync_rules(c)
    yield from _stage_rules(c)
    if c.cluster.num_learners > 1 and c.cluster.mode != "ray":
        yield ("cluster.num_learners", c.cluster.num_learners, "data-parallel ranks are Ray actors",
               "1, or cluster.mode ray")
    if c.data.task == "gsm8k" and c.data.train_path is None:
        yield "data.train_path", None, "gsm8k rows are read, not generated", "a JSONL path"
    rest = c.logging.run_dir.replace("{name}", "")
    if "{" in rest or "}" in rest:
        yield "logging.run_dir", c.logging.run_dir, "unknown placeholder", "a path whose only placeholder is {name}"
    if c.logging.local_dir is not None and not is_remote(c.logging.run_dir):
        yield ("logging.local_dir", c.logging.local_dir, "only a run_dir in a store has a separate local folder",
               "null, or a run_dir URI such as s3://bucket/runs/{name}")


def _stage_rules(c: Config) -> Iterable[tuple[str, object, str, str]]:
    seen: set[str] = set()
    for i, st in enumerate(c.curriculum):
        key = f"curriculum[{i}]."
        if st.name in seen:
            yield key + "name", st.name, "a second stage of this name", "a name unique in the curriculum"
        seen.add(st.name)
        if (st.steps is None) == (st.advance_at is None):
            yield key + "steps", st.steps, "a stage ends by steps or by advance_at", "exactly one of steps, advance_at"
        if st.advance_at is not None and st.max_steps is None:
            yield key + "advance_at", st.advance_at, "a threshold needs a bound", "set max_steps too"
        if st.max_steps is not None and st.advance_at is None:
            yield key + "max_steps", st.max_steps, "bounds a threshold stage only", "null, or set advance_at"
        if st.lr and not c.learner.lr:
            yield key + "lr", st.lr, "the stage scales learner.lr, which is 0", "null, or learner.lr > 0"
        if st.tier is not None and c.data.task != "symbols":
            yield key + "tier", st.tier, "tiers are generated symbol items", "null with data.task gsm8k"
        tokens = st.max_new_tokens or c.rollout.max_new_tokens
        if c.learner.micro_batch_tokens < c.rollout.max_prompt_tokens + tokens:
            yield (key + "max_new_tokens", tokens, "one full sequence must fit in learner.micro_batch_tokens",
                   f"<= {c.learner.micro_batch_tokens - c.rollout.max_prompt_tokens}")


def _sync_rules(c: Config) -> Iterable[tuple[str, object, str, str]]:
    cl, n = c.cluster, c.rollout.num_engines
    lg, rg = cl.learner_gpus, cl.rollout_gpus_per_engine
    if cl.weight_sync == "ipc" and not (cl.num_learners == 1 and 0 < lg < 1 and 0 < rg < 1 and lg + n * rg <= 1 + 1e-9):
        yield ("cluster.weight_sync", "ipc", "CUDA IPC needs the learner and every engine on one card",
               "ipc only with one learner and fractional GPUs summing to <= 1")
    if cl.weight_sync == "nccl" and (lg == 0 or rg == 0):
        yield "cluster.weight_sync", "nccl", "NCCL needs GPUs at both ends", "learner and rollout GPUs > 0"


def check(config: Config, sources: dict[str, str] | None = None) -> None:
    """Raise :class:`ConfigError` listing every broken cross-field rule."""
    sources = sources or {}
    def source(key: str) -> str:  # a stage's unset key: the stage's own line
        stage = key.rsplit(".", 1)[0]
        return sources.get(key) or (sources.get(stage, "default") if stage.endswith("]") else "default")

    issues = [Issue(k, v, p, a, source(k)) for k, v, p, a in _rules(config)]
    if issues:
        raise ConfigError(issues)
