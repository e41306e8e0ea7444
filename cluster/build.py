"""Building a run from its config: flat arguments for each role, and the Ray wiring.

``engine_spec`` / ``learner_kwargs`` / ``provider_kwargs`` turn the config tree into the
flat arguments of the plain classes (the classes never see the config). ``build_ray`` plans
placement against the cluster (an impossible request fails here, before any actor starts),
creates the placement group and the actor groups, and returns the loop's three interfaces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl.files import write_atomic


def device_for(gpus: float) -> str:
    import torch

    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def _lora(config) -> dict:
    lora = config.lora
    return dict(lora_rank=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=tuple(lora.target_modules), init_adapter=lora.init_from)


def engine_spec(config, device: str = "cpu", gpu_memory_utilization: float | None = None) -> tuple[str, dict]:
    """``(rollout.engine, its arguments)`` for :func:`actors.engines.build_engine`. A vLLM
    engine serves up to the longest prompt plus the longest completion any phase asks for, and
    reports the log-probs the run's sampling settings need."""
    from actors.models import resolve_dtype

    r = config.rollout
    kwargs = dict(model_path=config.model.name_or_path, **_lora(config), use_rslora=config.lora.use_rslora,
                  seed=r.seed, device=device, dtype=resolve_dtype(config.model.dtype, device))
    if r.engine == "hf":
        kwargs["load_options"] = load_options(config)
    else:
        from rl.interfaces import vllm_logprobs_mode

        longest = max([r.max_new_tokens, config.eval.max_new_tokens] +
                      [s.max_new_tokens for s in config.curriculum if s.max_new_tokens is not None])
        kwargs.update(max_model_len=r.max_prompt_tokens + longest, kv_cache_gib=r.vllm_kv_cache_gib,
                      gpu_memory_utilization=gpu_memory_utilization, adapter_mode=r.vllm_adapter_mode,
                      logprobs_mode=vllm_logprobs_mode(r.temperature, r.top_k, r.top_p),
                      trust_remote_code=config.model.trust_remote_code)
    return r.engine, kwargs


def learner_kwargs(config, device: str = "cpu") -> dict:
    learner, algo = config.learner, config.algorithm
    return dict(
        model_path=config.model.name_or_path, **_lora(config), use_rslora=config.lora.use_rslora,
        lr=learner.lr, weight_decay=learner.weight_decay, betas=(learner.adam_beta1, learner.adam_beta2),
        eps=learner.adam_eps, warmup_steps=round(learner.warmup_fraction * algo.steps), total_steps=algo.steps,
        lr_schedule=learner.lr_schedule, max_grad_norm=learner.max_grad_norm, zero_stage=learner.zero_stage,
        micro_batch_tokens=learner.micro_batch_tokens, precision=learner.precision,
        gradient_checkpointing=learner.gradient_checkpointing, clip_eps_low=algo.clip_eps_low,
        clip_eps_high=algo.clip_eps_high, kl_coef=algo.kl_coef, loss_aggregation=algo.loss_aggregation,
        constant_normaliser=config.rollout.max_new_tokens, tis_cap=algo.tis_cap,
        mask_truncated=algo.mask_truncated, temperature=config.rollout.temperature,
        optimizer=learner.optimizer, sft_steps=config.sft.steps, sft_lr=config.sft.lr, seed=learner.seed,
        device=device, load_options=load_options(config),
    )


def load_options(config) -> dict:
    """The base model's loading options (``model.attn_implementation``, ``model.trust_remote_code``)
    for :func:`actors.models.load_causal_lm`, as the learner and the hf engine take them."""
    return dict(attn_implementation=config.model.attn_implementation,
                trust_remote_code=config.model.trust_remote_code)


def provider_kwargs(config) -> dict:
    """Arguments of :func:`actors.upstream.build_provider` (``model=None``: the kind's default)."""
    from actors.upstream import RetryPolicy

    up = config.upstream
    model = None if up.model == "embedded" and up.provider != "local" else up.model
    return dict(kind=up.provider, model=model, base_url=up.base_url, project=up.project, region=up.region,
                timeout=up.timeout_s, retry=RetryPolicy(max_attempts=up.max_retries + 1))


@dataclass
class RayRun:
    """The loop's interfaces backed by actors, plus what a run needs to keep and release."""

    engine: Any
    learner: Any
    score: Any
    upstream: Any
    plan: Any
    placement_group: Any

    def shutdown(self) -> None:
        import ray
        from ray.util import remove_placement_group

        ray.get(self.upstream.close.remote())
        remove_placement_group(self.placement_group)


def connect(address: str | None) -> None:
    """Join ``address`` (or the job's cluster, ``$RAY_ADDRESS``), else start a local cluster.

    The dashboard binds to 127.0.0.1 (Ray's default), and nothing secret goes into a
    ``runtime_env``: API keys stay in the environment of the process that reads them.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True, configure_logging=False)


def build_ray(config, run: Path) -> RayRun:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from cluster import groups
    from cluster.hosts import EngineHost, LearnerHost, UpstreamHost, VerifierHost
    from cluster.placement import cluster_nodes, create_placement_group, plan, request_from_config

    cl = config.cluster
    the_plan = plan(request_from_config(cl, config.rollout), cluster_nodes())
    print("placement:\n" + the_plan.describe())
    write_atomic(run / "placement.json", json.dumps(placement_record(the_plan), indent=2) + "\n")
    pg = create_placement_group(the_plan, name=f"api-adapter-{config.logging.name}")
    learner_host = ray.remote(LearnerHost)
    learners = [learner_host.options(**groups.learner_options(the_plan, pg, rank)).remote(
                    learner_kwargs(config, device_for(cl.learner_gpus)), cl.cpus_per_learner, rank, cl.num_learners,
                    cl.socket_interface)
                for rank in range(cl.num_learners)]
    # Every engine has the same share of a card, so the same memory fraction as engine 0.
    memory = the_plan.gpu_memory_utilization(0, config.rollout.gpu_memory_utilization)
    kind, kwargs = engine_spec(config, device_for(cl.rollout_gpus_per_engine), memory)
    engines = groups.make_group(EngineHost, config.rollout.num_engines,
                                lambda i: groups.engine_options(the_plan, pg, i),
                                kind, kwargs, cl.cpus_per_engine, cl.socket_interface)
    verifiers = groups.make_group(VerifierHost, cl.num_verifiers, lambda i: groups.verifier_options(the_plan, pg, i),
                                  "binary")
    # The cache's one owner lives where the driver runs, so the cache file is on the driver's disk.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    upstream = groups.make_group(UpstreamHost, 1, lambda i: {"num_cpus": 0, "scheduling_strategy": here},
                                 provider_kwargs(config), str(config.upstream.cache_path or run / "upstream_cache.sqlite"),
                                 config.upstream.max_concurrency, config.upstream.max_requests)[0]
    learner = groups.LearnerGroup(learners)
    kind = weight_sync_transport(the_plan, config.rollout.num_engines, cl.weight_sync)
    print(f"weight sync: {kind}")
    engine = groups.EngineGroup(engines, groups.LearnerPush(kind, learners[0], engines, cl.weight_sync_timeout_s),
                                nodes=[the_plan.actor("rollout", i).node_id for i in range(len(engines))],
                                verify=cl.verify_sync)
    engine.sync_from(learner)  # one starting point
    return RayRun(engine, learner, groups.VerifierPool(verifiers), upstream, the_plan, pg)


def placement_record(the_plan) -> dict:
    """Where each actor of the plan goes (``RUN/placement.json``): node id and IP, CPUs, GPUs,
    cards; no node for an actor that reserves nothing (Ray places it)."""
    ip = {n.node_id: n.ip for n in the_plan.nodes}
    return {a.name: {"node_id": a.node_id, "ip": ip.get(a.node_id), "cpus": a.cpus,
                     "gpus": a.gpus, "cards": list(a.cards)} for a in the_plan.actors}


def weight_sync_transport(the_plan, num_engines: int, requested: str) -> str:
    """The transport from the learner to every engine (:meth:`cluster.placement.Plan.transport`
    per engine, in cluster/weight_sync.py's names). One transport serves all engines: where
    ``auto`` would pick different ones (some engines on the learner's card, some not), the
    one that works for all is used, the object store."""
    names = {"ipc": "cuda_ipc"}
    kinds = {names.get(k, k) for k in (the_plan.transport(i, requested) for i in range(num_engines))}
    return kinds.pop() if len(kinds) == 1 else "object_store"


def raise_if_actor_lost(error: BaseException, checkpoints) -> None:
    """Turn a dead actor the run cannot do without (a learner rank; engines are dropped or
    restarted instead: cluster/groups.py) into :class:`rl.checkpoint.RunAborted`, naming the
    checkpoint to resume from (``checkpoints``: the run's rl.checkpoint.CheckpointManager); any
    other error is left alone."""
    import ray

    from rl.checkpoint import RunAborted

    if not isinstance(error, ray.exceptions.RayActorError):
        return
    latest = checkpoints.latest()
    cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    where = (f"the last checkpoint is {latest}: on a cluster with the resources, submit the same "
             f"command with --set checkpoint.resume=true to continue from it" if latest else
             "no checkpoint was written yet: the run starts over")
    raise RunAborted(f"a Ray actor the run needs died ({cause}); {where}") from error
