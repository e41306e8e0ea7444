"""Synthesize math questions whose answers a resolver derived with SymPy tools (issue #8).

    api-adapter synthesize --config configs/synthesis/anthropic.yaml
    api-adapter synthesize --config configs/synthesis/anthropic.yaml --questions-per-tier 2 --out data/q.jsonl
    api-adapter synthesize --generator-provider vertex --resolver-provider vertex \\
        --vertex-project P --vertex-region us-east5

The generator (any upstream provider) writes a question per tier and random topic; the
resolver (Claude directly or on Vertex: it needs tool calling) derives each answer from
scratch by calling the SymPy tools of :mod:`verifiers.sympy_tools`, each call in a killable,
memory-capped worker; double-checked tiers are resolved twice, the second time by the
``checker`` model when one is set, and kept only when both agree (:mod:`rl.synthesis`).
Every model call goes through the run's answer cache the moment it returns, so a rerun of
the same command makes no request it already made. Output: the dataset JSONL (each row with
its provenance) and ``<name>.summary.json`` (kept, dropped and why), both written atomically.
Exit status: 0; 1 when no question was kept; 2 for a bad config or flag; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(REPO))

MODEL_KEYS = ("provider", "model", "base_url", "vertex_project", "vertex_region")
TOP_KEYS = ("out", "cache", "generator", "resolver", "checker", "synthesis", "tools",
            "concurrency", "timeout", "max_attempts")
DEFAULTS = {
    "out": "runs/synthesis/questions.jsonl", "cache": "runs/synthesis/cache.sqlite",
    "generator": {"provider": "anthropic"}, "resolver": {"provider": "anthropic"}, "checker": None,
    "synthesis": {}, "tools": {"budget_s": 5.0, "memory_mb": 1024},
    "concurrency": 8, "timeout": 60.0, "max_attempts": 5,
}


class ConfigError(ValueError):
    """A bad config key or value; the message names it."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="api-adapter synthesize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML config (configs/synthesis/anthropic.yaml); flags override it")
    p.add_argument("--out", help="dataset JSONL (config: out)")
    p.add_argument("--cache", help="answer cache (config: cache)")
    p.add_argument("--questions-per-tier", type=int, help="config: synthesis.questions_per_tier")
    p.add_argument("--seed", type=int, help="topic RNG seed (config: synthesis.seed)")
    p.add_argument("--generator-temperature", type=float, help="config: synthesis.generator_temperature")
    p.add_argument("--resolver-temperature", type=float, help="config: synthesis.resolver_temperature")
    for role in ("generator", "resolver"):
        p.add_argument(f"--{role}-provider", help=f"config: {role}.provider")
        p.add_argument(f"--{role}-model", help=f"config: {role}.model")
    p.add_argument("--base-url", help="the API's base URL for every model (config: <role>.base_url)")
    p.add_argument("--vertex-project", help="for vertex models (default: $GOOGLE_CLOUD_PROJECT)")
    p.add_argument("--vertex-region", help="for vertex models (default: $GOOGLE_CLOUD_REGION)")
    return p


def load_config(path: Path | None, args: argparse.Namespace | None = None) -> dict:
    """The config file over the defaults, then the flags over both; unknown keys are errors."""
    import yaml

    config = json.loads(json.dumps(DEFAULTS))
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"{path}: cannot read the config: {error}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the config must be a mapping")
        unknown = sorted(set(loaded) - set(TOP_KEYS))
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(TOP_KEYS)}")
        config.update(loaded)
    if args is not None:
        _apply_flags(config, args)
    _validate(config)
    return config


def _apply_flags(config: dict, args: argparse.Namespace) -> None:
    for flag, key in (("out", "out"), ("cache", "cache")):
        if getattr(args, flag) is not None:
            config[key] = getattr(args, flag)
    synthesis = config["synthesis"] = dict(config.get("synthesis") or {})
    for name in ("questions_per_tier", "seed", "generator_temperature", "resolver_temperature"):
        if getattr(args, name) is not None:
            synthesis[name] = getattr(args, name)
    for role in ("generator", "resolver", "checker"):
        section = config.get(role)
        if section is None:
            continue
        section = config[role] = dict(section)
        for key in ("provider", "model"):
            value = getattr(args, f"{role}_{key}", None)
            if value is not None:
                section[key] = value
        for key in ("base_url", "vertex_project", "vertex_region"):
            if getattr(args, key) is not None:
                section[key] = getattr(args, key)


def _validate(config: dict) -> None:
    from rl.synthesis import SynthesisSettings

    for role in ("generator", "resolver", "checker"):
        section = config.get(role)
        if section is None and role == "checker":
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"{role}: expected a mapping with keys {', '.join(MODEL_KEYS)}")
        unknown = sorted(set(section) - set(MODEL_KEYS))
        if unknown:
            raise ConfigError(f"{role}: unknown key(s) {', '.join(unknown)}; known: {', '.join(MODEL_KEYS)}")
        allowed = ("anthropic", "vertex") if role != "generator" else ("anthropic", "vertex", "openai", "local")
        if section.get("provider") not in allowed:
            raise ConfigError(f"{role}.provider: got {section.get('provider')!r}, expected one of "
                              f"{', '.join(allowed)}" + (" (tool calling)" if role != "generator" else ""))
    fields = {f.name for f in dataclasses.fields(SynthesisSettings)}
    unknown = sorted(set(config["synthesis"] or {}) - fields)
    if unknown:
        raise ConfigError(f"synthesis: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    try:
        settings(config)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"synthesis.{error}") from None
    tools = config["tools"]
    if not isinstance(tools, dict) or set(tools) - {"budget_s", "memory_mb"}:
        raise ConfigError("tools: expected a mapping with keys budget_s, memory_mb")
    if not 0 < float(tools.get("budget_s", 5.0)) <= 300:
        raise ConfigError(f"tools.budget_s: got {tools.get('budget_s')!r}, expected a number in (0, 300]")
    for key, low, high in (("concurrency", 1, 256), ("max_attempts", 1, 20), ("timeout", 1, 3600)):
        value = config[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
            raise ConfigError(f"{key}: got {value!r}, expected a number in [{low}, {high}]")


def settings(config: dict):
    from rl.synthesis import SynthesisSettings

    values = dict(config["synthesis"] or {})
    for key in ("tiers", "topics", "double_check_tiers"):
        if key in values:
            if not isinstance(values[key], list):
                raise ValueError(f"{key}: got {values[key]!r}, expected a list")
            values[key] = tuple(values[key])
    return SynthesisSettings(**values)


def build_model(section: dict, config: dict):
    from actors.upstream import RetryPolicy, build_provider

    return build_provider(section["provider"], section.get("model"), base_url=section.get("base_url"),
                          project=section.get("vertex_project"), region=section.get("vertex_region"),
                          timeout=float(config["timeout"]),
                          retry=RetryPolicy(max_attempts=int(config["max_attempts"])))


async def run_synthesis(settings, generator, resolvers: list, cache, runner, concurrency: int = 8):
    """Synthesize with ``generator`` (a provider) and ``resolvers`` (one or two anthropic/vertex
    providers: resolution k uses ``resolvers[k % len]``); returns ``(outcomes, tallies)``."""
    from actors.upstream import UpstreamClient, UpstreamRequest
    from actors.upstream.tools import ToolTurnProvider, converse
    from rl.synthesis import GeneratorReply, synthesize
    from verifiers.sympy_tools import TOOL_SCHEMAS

    # Claude generates through the Messages turn of the tool loop (no tools): the plain
    # AnthropicProvider cannot send a temperature with the installed SDK.
    messages_turns = generator.name in ("anthropic", "vertex")
    gen = UpstreamClient(ToolTurnProvider(generator) if messages_turns else generator, cache,
                         concurrency=concurrency)
    res = [UpstreamClient(ToolTurnProvider(p), cache, concurrency=concurrency) for p in resolvers]

    async def generate(system, prompt, temperature, max_tokens, sample_index):
        if messages_turns:
            talk = await converse(gen, system=system, prompt=prompt, tools=[], execute=runner.run,
                                  max_tokens=max_tokens, temperature=temperature, max_rounds=1,
                                  sample_index=sample_index)
            turn = talk.turns[0]
            return GeneratorReply(talk.text, talk.error, gen.name, gen.model, turn["key"], turn["cached"])
        request = UpstreamRequest(prompt, system=system, max_tokens=max_tokens,
                                  temperature=temperature, sample_index=sample_index)
        answer = await gen.answer(request)
        return GeneratorReply(answer.text, answer.error, gen.name, gen.model, gen.key(request), answer.cached)

    async def resolve(index, system, prompt, temperature, max_tokens, max_rounds):
        return await converse(res[index % len(res)], system=system, prompt=prompt, tools=TOOL_SCHEMAS,
                              execute=runner.run, max_tokens=max_tokens, temperature=temperature,
                              max_rounds=max_rounds)

    try:
        outcomes = await synthesize(settings, generate, resolve)
    finally:
        for client in (gen, *res):
            await client.aclose()
    tallies = {"generator": gen.tally.to_json(gen.pricing)}
    tallies.update({f"resolver_{i}": c.tally.to_json(c.pricing) for i, c in enumerate(res)})
    return outcomes, tallies


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args)
        models = [build_model(config["generator"], config), build_model(config["resolver"], config)]
        if config["checker"] is not None:
            models.append(build_model(config["checker"], config))
    except (ConfigError, ValueError) as error:
        print(f"api-adapter synthesize: {error}", file=sys.stderr)
        return 2
    from actors.upstream import AnswerCache
    from rl.synthesis import summarize, summary_path, write_outputs
    from verifiers.sympy_tools import ToolRunner

    out = Path(config["out"])
    tools = config["tools"]
    try:
        with AnswerCache(config["cache"]) as cache, \
                ToolRunner(float(tools.get("budget_s", 5.0)), int(tools.get("memory_mb", 1024))) as runner:
            outcomes, tallies = asyncio.run(run_synthesis(settings(config), models[0], models[1:], cache,
                                                          runner, int(config["concurrency"])))
    except KeyboardInterrupt:
        print("interrupted: every answer so far is in the cache; rerun to continue", file=sys.stderr)
        return 130
    summary = {**summarize(outcomes), "calls": tallies, "config": config}
    write_outputs(outcomes, out, summary)
    print(f"kept {summary['kept']} of {summary['planned']} questions -> {out}")
    for kind, count in sorted(summary["drop_reasons"].items()):
        print(f"  dropped ({kind}): {count}")
    print(f"summary: {summary_path(out)}")
    return 0 if summary["kept"] else 1


if __name__ == "__main__":
    sys.exit(main())
