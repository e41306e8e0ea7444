"""Question synthesis end to end: the real ``anthropic`` SDK against the local Messages-API
server, scripted tool calls, real SymPy tools in their worker, the answer cache.

Also the tool-calling loop itself (:mod:`actors.upstream.tools`), which the pipeline runs on.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from tests.actors.messages_server import MessagesServer, error, ok, respond, tool_use

from actors.upstream import AnswerCache, RetryPolicy, UpstreamClient, make_provider
from actors.upstream.tools import ToolTurnProvider, converse
from rl.synthesis import (
    SynthesisSettings, generator_prompt, plan, resolver_prompt, summarize, summary_path, write_outputs,
)
from scripts.synthesize import ConfigError, load_config, run_synthesis
from verifiers.sympy_tools import TOOL_SCHEMAS, ToolRunner

FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)
SETTINGS = SynthesisSettings(tiers=("easy", "medium", "hard", "expert"), questions_per_tier=1,
                             topics=("number theory",), double_check_tiers=("hard", "expert"))
EASY_Q, MEDIUM_Q = "What is 2**10 mod 7?", "What is 2 + 3?"
HARD_Q, EXPERT_Q = "How many distinct primes divide 360?", "How many distinct primes divide 30030?"


@pytest.fixture
def server():
    with MessagesServer() as running:
        yield running


@pytest.fixture(scope="module")
def runner():
    with ToolRunner(budget_s=2.0, memory_mb=512) as running:
        yield running


def anthropic(server):
    return make_provider("anthropic", api_key=server.api_key, base_url=server.url, timeout=5.0, retry=FAST)


def first_result(results: list[dict]):
    return ok(f"The tool says so. \\boxed{{{results[0]['content']}}}")


def count_primes(results: list[dict], offset: int = 0):
    return ok(f"\\boxed{{{len(results[0]['content'].split(':')) - 1 + offset}}}")


def script(server: MessagesServer) -> None:
    """Four questions: easy (wrong stated answer), medium (resolved without tools), hard
    (two resolutions that disagree), expert (two that agree)."""
    slots = {slot.tier: slot for slot in plan(SETTINGS)}
    stated = {"easy": (EASY_Q, "3"), "medium": (MEDIUM_Q, "5"), "hard": (HARD_Q, "3"), "expert": (EXPERT_Q, "6")}
    for tier, (question, answer) in stated.items():
        server.script[generator_prompt(slots[tier])] = [ok(f"QUESTION: {question}\nANSWER: {answer}")]
    server.script[resolver_prompt(EASY_Q, 0)] = [
        tool_use(("mod_pow", {"base": "2", "exponent": "10", "modulus": "7"})), respond(first_result)]
    server.script[resolver_prompt(MEDIUM_Q, 0)] = [ok("\\boxed{5}")]
    factor = tool_use(("factorint", {"n": "360"}))
    server.script[resolver_prompt(HARD_Q, 0)] = [factor, respond(count_primes)]
    server.script[resolver_prompt(HARD_Q, 1)] = [factor, respond(lambda r: count_primes(r, offset=1))]
    for k in (0, 1):
        server.script[resolver_prompt(EXPERT_Q, k)] = [
            tool_use(("factorint", {"n": "30030"}), text="Let me factor."), respond(count_primes)]


def synthesize(server, cache, runner, settings=SETTINGS):
    return asyncio.run(run_synthesis(settings, anthropic(server), [anthropic(server)], cache, runner))


def test_synthesis_keeps_tool_derived_answers_and_drops_the_rest(server, runner, tmp_path):
    script(server)
    with AnswerCache(tmp_path / "cache.sqlite") as cache:
        outcomes, tallies = synthesize(server, cache, runner)
    by_tier = {o.slot.tier: o for o in outcomes}

    easy = by_tier["easy"].row  # answered from the tool's result; the generator's 3 ignored
    assert easy["answer"] == "2" and easy["question"] == EASY_Q and easy["topic"] == "number theory"
    [resolution] = easy["provenance"]["resolutions"]
    assert [(c["name"], c["result"], c["is_error"]) for c in resolution["tool_calls"]] == [("mod_pow", "2", False)]
    assert easy["provenance"]["generator"]["stated_answer"] == "3"
    assert easy["provenance"]["generator"]["stated_agrees"] is False
    assert len(resolution["turns"]) == 2 and all(len(t["key"]) == 64 for t in resolution["turns"])

    assert by_tier["medium"].row is None and by_tier["medium"].drop == "no_tool_call"
    hard = by_tier["hard"]
    assert hard.row is None and hard.drop == "disagree" and "'3' vs '4'" in hard.detail
    assert len(hard.provenance["resolutions"]) == 2  # both kept in the record of the drop
    expert = by_tier["expert"].row
    assert expert["answer"] == "6" and expert["provenance"]["double_checked"]
    assert expert["provenance"]["generator"]["stated_agrees"] is True

    summary = summarize(outcomes)
    assert (summary["kept"], summary["dropped"]) == (2, 2)
    assert summary["drop_reasons"] == {"no_tool_call": 1, "disagree": 1}
    assert tallies["resolver_0"]["calls"] == 2 + 1 + 4 + 4 and tallies["generator"]["calls"] == 4


def test_the_resolver_gets_tool_results_and_sends_them_back(server, runner, tmp_path):
    script(server)
    with AnswerCache(tmp_path / "cache.sqlite") as cache:
        synthesize(server, cache, runner, SynthesisSettings(tiers=("easy",), questions_per_tier=1,
                                                            topics=("number theory",), double_check_tiers=()))
    second = [b for b in server.bodies if len(b["messages"]) == 3]
    [body] = second
    assert [block["name"] for block in body["tools"]] == [s["name"] for s in TOOL_SCHEMAS]
    assert body["messages"][1]["content"][0]["type"] == "tool_use"
    [result] = body["messages"][2]["content"]
    assert result == {"type": "tool_result", "tool_use_id": body["messages"][1]["content"][0]["id"], "content": "2"}
    assert body["temperature"] == 0.0 and "tools" in body["system"]


def test_rerun_replays_from_the_cache_with_no_request(server, runner, tmp_path):
    script(server)
    with AnswerCache(tmp_path / "cache.sqlite") as cache:
        first, _ = synthesize(server, cache, runner)
        sent = sum(server.requests.values())
        again, tallies = synthesize(server, cache, runner)
    assert sum(server.requests.values()) == sent
    assert all(t["calls"] == 0 for t in tallies.values()) and tallies["resolver_0"]["cache_hits"] == 11
    assert [o.row and o.row["answer"] for o in again] == [o.row and o.row["answer"] for o in first]
    assert all(turn["cached"] for o in again if o.row for r in o.row["provenance"]["resolutions"] for turn in r["turns"])


def test_outputs_are_written_with_provenance(server, runner, tmp_path):
    script(server)
    with AnswerCache(tmp_path / "cache.sqlite") as cache:
        outcomes, _ = synthesize(server, cache, runner)
    out = tmp_path / "data" / "questions.jsonl"
    write_outputs(outcomes, out, summarize(outcomes))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["tier"] for r in rows] == ["easy", "expert"]
    assert set(rows[0]) == {"question", "answer", "tier", "topic", "provenance"}
    summary = json.loads(summary_path(out).read_text())
    assert summary["drops"][0]["kind"] == "no_tool_call" and summary["drops"][1]["reason"].startswith("resolutions disagree")
    assert not list(out.parent.glob(".*tmp"))


def test_repeated_prompts_are_separate_samples_and_any_generator_works(server, runner, tmp_path):
    """Two questions with one tier and topic: two generator calls (sample_index keeps their
    cache keys apart), here through the OpenAI-compatible provider."""
    settings = SynthesisSettings(tiers=("easy",), questions_per_tier=2, topics=("number theory",),
                                 double_check_tiers=())
    [slot, _] = plan(settings)
    script(server)
    server.script[generator_prompt(slot)] = [ok(f"QUESTION: {EASY_Q}"), ok(f"QUESTION: {HARD_Q}\nANSWER: 3")]
    server.script[resolver_prompt(HARD_Q, 0)] = [tool_use(("factorint", {"n": "360"})), respond(count_primes)]
    generator = make_provider("openai", model="gen", base_url=server.url, timeout=5.0, retry=FAST)
    with AnswerCache(tmp_path / "cache.sqlite") as cache:
        outcomes, tallies = asyncio.run(run_synthesis(settings, generator, [anthropic(server)], cache, runner))
    assert sorted(o.row["question"] for o in outcomes) == sorted([EASY_Q, HARD_Q])
    assert server.requests[generator_prompt(slot)] == 2 and tallies["generator"]["calls"] == 2
    assert all(o.row["provenance"]["generator"]["model"] == "gen" for o in outcomes)
    easy = next(o.row for o in outcomes if o.row["question"] == EASY_Q)
    assert easy["provenance"]["generator"]["stated_agrees"] is None  # no answer stated


def resolver_client(provider, cache=None):
    return UpstreamClient(ToolTurnProvider(provider), cache)


def talk(client, prompt, runner, max_rounds=4):
    async def go():
        try:
            return await converse(client, system="s", prompt=prompt, tools=TOOL_SCHEMAS,
                                  execute=runner.run, max_rounds=max_rounds)
        finally:
            await client.aclose()
    return asyncio.run(go())


def test_a_bad_tool_call_goes_back_as_an_error_result(server, runner):
    server.script["q"] = [tool_use(("simplify", {"expression": "__import__('os')"})),
                          respond(lambda r: ok(f"error={r[0]['is_error']}: {r[0]['content'][:20]}"))]
    conversation = talk(resolver_client(anthropic(server)), "q", runner)
    assert conversation.text == "error=True: function '__import__" and conversation.error is None
    assert conversation.tool_calls[0].is_error


def test_rounds_are_bounded_and_failures_recorded(server, runner):
    server.script["loop"] = [tool_use(("gcd", {"numbers": ["4", "6"]}))]
    conversation = talk(resolver_client(anthropic(server)), "loop", runner, max_rounds=3)
    assert conversation.error == "no final answer after 3 model calls" and len(conversation.tool_calls) == 3
    server.script["down"] = [error(529)]
    conversation = talk(resolver_client(anthropic(server)), "down", runner)
    assert conversation.error.startswith("call failed: HTTP 529") and server.requests["down"] == 3


def test_vertex_resolver(server, runner):
    provider = make_provider("vertex", project="p", region="us-east5", access_token=server.access_token,
                             base_url=server.url + "/v1", timeout=5.0, retry=FAST)
    server.script["v"] = [tool_use(("binomial", {"n": "10", "k": "3"})), respond(first_result)]
    conversation = talk(resolver_client(provider), "v", runner)
    assert conversation.text.endswith("\\boxed{120}") and conversation.provider == "vertex"
    assert server.paths[-1].endswith(":rawPredict")


def test_tool_calling_needs_an_anthropic_provider():
    local = type("P", (), {"name": "openai", "model": "m", "endpoint": "e", "retry": FAST})()
    with pytest.raises(ValueError, match="anthropic or vertex"):
        ToolTurnProvider(local)


def test_config_errors_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    for text, message in [
        ("synthesis: {tierz: [a]}\n", "synthesis: unknown key(s) tierz"),
        ("synthesis: {questions_per_tier: 0}\n", "synthesis.questions_per_tier: got 0"),
        ("synthesis: {double_check_tiers: [insane]}\n", "synthesis.double_check_tiers"),
        ("resolver: {provider: openai}\n", "resolver.provider: got 'openai'"),
        ("generator: {provider: anthropic, modle: x}\n", "generator: unknown key(s) modle"),
        ("tools: {budget_s: 0}\n", "tools.budget_s"),
        ("outt: x\n", "unknown key(s) outt"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_config(path)
    assert load_config("configs/synthesis/anthropic.yaml")["synthesis"]["double_check_tiers"] == ["hard"]
