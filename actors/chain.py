"""The chain for users: upstream answer -> adapter check -> final answer, for new expressions.

One call of :meth:`Chain.answer_batch` does, for a batch of custom-symbol expressions:

1. asks the upstream for each expression (the seed's calculator request, through the
   :class:`~actors.upstream.UpstreamClient` and its answer cache, all at once);
2. renders each adapter prompt with the upstream's parsed answer (:func:`rl.prompts.adapter_prompt`,
   the run's condition and response prefix) and generates greedily, the whole batch at once;
3. reads the adapter's decision and the final answer (:func:`decide`).

Decisions and the final answer
------------------------------
``"CORRECT"``: the adapter accepted the upstream's answer, which is the final answer (none when
the upstream gave none). ``"override"``: the adapter boxed a number, which is the final answer.
``"none"``: no box, or a box that holds neither CORRECT nor one number. **Then the final answer
is the upstream's** (``fallback=True``): a user asked a question and the API did answer it, so
an adapter that says nothing readable leaves the API's answer standing rather than turning it
into no answer. This differs on purpose from training and evaluation, where an unreadable
completion scores 0 (the reward must not pay for silence); ``fallback`` says when it happened.

Threads and the event loop
--------------------------
The upstream client is asyncio (its semaphore, in-flight sharing and the local provider's
micro-batching queue all belong to one event loop), while callers here are plain threads (the
CLI, or one thread per HTTP request). The chain therefore owns one event loop running in a
daemon thread for its whole life and submits each batch's requests to it
(``asyncio.run_coroutine_threadsafe``): concurrent callers share the cache, identical in-flight
requests and the local provider's batches. Generation is serialised by the engine's own lock.

The adapter
-----------
:func:`adapter_settings` reads a PEFT checkpoint folder (``adapter_config.json``: rank, alpha,
targets, rsLoRA, base model) and, when the folder sits in a training run
(``RUN/checkpoints/step_X``, or has a ``config.yaml`` itself), the run's resolved config: the
prompt condition, the response prefix, stop strings, the base model, the evaluation's
``max_new_tokens`` and the upstream's ``max_tokens`` (the upstream provider itself is the
caller's choice). ``adapter=None`` is the base model alone: the engine gets a rank-1 LoRA
whose ``B`` is zero (the identity) with its layers disabled, so the outputs are the base
model's and the decode loop is the one training and evaluation use.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

from rl.prompts import CONDITIONS, adapter_prompt
from rl.records import SamplingParams
from verifiers.answers import extract_boxed, is_correct_token, read_box
from verifiers.symbols import SEED_SYMBOLS, SymbolError, evaluate, tokenize

DECISIONS = ("CORRECT", "override", "none")
DEFAULT_MAX_NEW_TOKENS = 256  # rl.config's eval.max_new_tokens, when no run config says otherwise


MAX_EXPRESSION_CHARS = 300
MAX_OPERAND_DIGITS = 30
"""Limits on what the chain takes: the prompt (few-shot head + expression + the upstream's
answer) must fit the adapter's context, and no arithmetic the model is asked to check has
operands this long."""


class ChainInputError(ValueError):
    """An expression the chain refuses; the message names the item and the problem."""


@dataclass(frozen=True)
class ChainAnswer:
    """The chain's answer to one expression; every field is JSON-ready.

    expression: the input as sent upstream (surrounding spaces stripped);
    upstream_text: the upstream's raw reply (None when the call failed);
    upstream_answer: the number read from it as an exact string (``"7"``, ``"7/2"``), or None;
    upstream_error: why there is no upstream answer (failed call, refusal, ...), else None;
    upstream_cached: served from the answer cache;
    completion: the adapter's response prefix + generated text;
    decision: ``"CORRECT"`` | ``"override"`` | ``"none"`` (see the module docstring);
    final_answer: exact string or None; fallback: the final answer is the upstream's because the
    adapter gave no readable answer; latency_s: wall time of the whole batch this item was in.
    """

    expression: str
    upstream_text: str | None
    upstream_answer: str | None
    upstream_error: str | None
    upstream_cached: bool
    completion: str
    decision: str
    final_answer: str | None
    fallback: bool
    latency_s: float

    def to_json(self) -> dict:
        return asdict(self)


def check_expression(expression: Any, where: str = "expression") -> str:
    """The expression stripped, or :class:`ChainInputError` naming ``where`` and the problem
    (:func:`verifiers.symbols.tokenize`'s message, with the position).

    >>> check_expression(" 3 θ 4 ")
    '3 θ 4'
    >>> check_expression("3 θ x", "expressions[1]")
    Traceback (most recent call last):
    ...
    actors.chain.ChainInputError: expressions[1]: unexpected character 'x' at position 4
    """
    if not isinstance(expression, str):
        raise ChainInputError(f"{where}: must be a string, got {type(expression).__name__}")
    if not expression.strip():
        raise ChainInputError(f"{where}: is empty")
    if len(expression.strip()) > MAX_EXPRESSION_CHARS:
        raise ChainInputError(f"{where}: is {len(expression.strip())} characters; at most {MAX_EXPRESSION_CHARS}")
    try:
        tokens = tokenize(expression, SEED_SYMBOLS)
    except SymbolError as error:
        raise ChainInputError(f"{where}: {error}") from None
    long = next((t for t in tokens[::2] if len(str(t)) > MAX_OPERAND_DIGITS), None)
    if long is not None:
        raise ChainInputError(f"{where}: an operand has {len(str(long))} digits; at most {MAX_OPERAND_DIGITS}")
    try:
        evaluate(expression, SEED_SYMBOLS)
    except ZeroDivisionError:
        raise ChainInputError(f"{where}: divides by zero, so it has no value to check") from None
    return expression.strip()


def decide(completion: str, upstream_answer: Fraction | None) -> tuple[str, Fraction | None, bool]:
    r"""``(decision, final answer, fallback)`` for one adapter completion (module docstring).

    >>> decide(r"\boxed{CORRECT}", Fraction(7))
    ('CORRECT', Fraction(7, 1), False)
    >>> decide(r"\boxed{12}", Fraction(7))
    ('override', Fraction(12, 1), False)
    >>> decide("I think it is fine", Fraction(7))
    ('none', Fraction(7, 1), True)
    """
    box = extract_boxed(completion)
    if box is not None and is_correct_token(box):
        return "CORRECT", upstream_answer, False
    value = read_box(box, upstream_answer)
    if value is not None:
        return "override", value, False
    return "none", upstream_answer, True


def _text(value: Fraction | None) -> str | None:
    return None if value is None else str(value)


class Chain:
    """An upstream client and an adapter engine, answering expressions (module docstring).

    upstream: an :class:`~actors.upstream.UpstreamClient` (or a provider); the chain closes it
    in :meth:`close`, the client's cache stays the caller's. engine: a rollout engine
    (``generate`` and ``tokenizer``, e.g. :class:`actors.rollout_hf.HFRolloutEngine`).
    condition / response_prefix / stop / answer_format / thinking: as in the training run;
    max_new_tokens: the adapter's cap (greedy); upstream_max_tokens: the upstream's reply cap
    (None: the seed's 64);
    model / adapter: names reported by :meth:`describe`.
    """

    def __init__(self, upstream: Any, engine: Any, *, condition: str = "D", response_prefix: str = "",
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, stop: Sequence[str] = (),
                 upstream_max_tokens: int | None = None, model: str | None = None,
                 adapter: str | None = None, answer_format: str = "box", thinking: bool = False) -> None:
        if condition not in CONDITIONS:
            raise ValueError(f"condition {condition!r} is not one of {CONDITIONS}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.upstream, self.engine = upstream, engine
        self.condition, self.response_prefix = condition, response_prefix or ""
        self.answer_format, self.thinking = answer_format, thinking
        self.sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=tuple(stop))
        self.upstream_max_tokens = upstream_max_tokens
        self.model, self.adapter = model, adapter
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chain-upstream", daemon=True)
        self._thread.start()
        self._closed = False

    def describe(self) -> dict:
        """What the chain runs, for logs and the health endpoint."""
        return {"model": self.model, "adapter": self.adapter, "condition": self.condition,
                "answer_format": self.answer_format, "response_prefix": self.response_prefix, "max_new_tokens": self.sampling.max_new_tokens,
                "upstream": {"provider": getattr(self.upstream, "name", None),
                             "model": getattr(self.upstream, "model", None)}}

    def answer_batch(self, expressions: Sequence[str]) -> list[ChainAnswer]:
        """Answer every expression (in order); :class:`ChainInputError` before any call when
        one is malformed."""
        if self._closed:
            raise RuntimeError("the chain is closed")
        checked = [check_expression(e, f"expressions[{i}]") for i, e in enumerate(expressions)]
        if not checked:
            return []
        start = time.perf_counter()
        replies = self._ask_upstream(checked)
        prompts = [adapter_prompt(self.engine.tokenizer, e, r.answer, self.condition,
                                  response_prefix=self.response_prefix, answer_format=self.answer_format,
                                  thinking=self.thinking)
                   for e, r in zip(checked, replies)]
        completions = sorted(self.engine.generate(prompts, 1, self.sampling), key=lambda c: c.prompt_index)
        latency = time.perf_counter() - start
        answers = []
        for expression, reply, prompt, done in zip(checked, replies, prompts, completions):
            completion = prompt.response_prefix + done.text
            decision, final, fallback = decide(completion, reply.answer)
            answers.append(ChainAnswer(
                expression=expression, upstream_text=reply.text, upstream_answer=_text(reply.answer),
                upstream_error=reply.error, upstream_cached=reply.cached, completion=completion,
                decision=decision, final_answer=_text(final), fallback=fallback, latency_s=round(latency, 4)))
        return answers

    def _ask_upstream(self, expressions: list[str]) -> list:
        from actors.upstream import UpstreamRequest

        overrides = {} if self.upstream_max_tokens is None else {"max_tokens": self.upstream_max_tokens}
        requests = [UpstreamRequest.symbol(e, **overrides) for e in expressions]

        async def ask():
            return list(await asyncio.gather(*(self.upstream.answer(r) for r in requests)))

        return asyncio.run_coroutine_threadsafe(ask(), self._loop).result()

    def close(self) -> None:
        """Close the upstream (its provider) and stop the event loop; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self.upstream.aclose(), self._loop).result(timeout=60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=60)
            self._loop.close()

    def __enter__(self) -> "Chain":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- the adapter


@dataclass(frozen=True)
class AdapterSettings:
    """Everything the chain needs to rebuild an adapter (or the base model alone).

    path: the PEFT folder, None for the base model; base_model: ``"embedded"`` or a folder;
    lora_rank / lora_alpha / target_modules: for the engine (rsLoRA is folded into alpha);
    condition / answer_format / response_prefix / stop / max_new_tokens: the prompt and
    generation settings (as the adapter was trained with);
    upstream_max_tokens: the run's upstream reply cap (None: the seed's 64), so the upstream
    answers as it did in training; run_config: the run config they were read from, None when
    they are defaults or given.
    """

    path: Path | None
    base_model: str
    lora_rank: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str
    condition: str
    response_prefix: str
    stop: tuple[str, ...]
    max_new_tokens: int
    upstream_max_tokens: int | None = None
    run_config: Path | None = None
    answer_format: str = "box"
    thinking: bool = False


def find_run_config(adapter: Path) -> Path | None:
    """``config.yaml`` in the adapter folder, else ``RUN/config.yaml`` for ``RUN/checkpoints/step_X``."""
    if (adapter / "config.yaml").is_file():
        return adapter / "config.yaml"
    if adapter.name == "adapter" and (adapter.parent / "config.yaml").is_file():  # step_X/adapter
        return adapter.parent / "config.yaml"
    run = adapter.resolve().parent.parent
    if adapter.resolve().parent.name == "checkpoints" and (run / "config.yaml").is_file():
        return run / "config.yaml"
    return None


def adapter_settings(adapter: str | Path | None, *, base_model: str | None = None,
                     condition: str | None = None, response_prefix: str | None = None,
                     stop: Sequence[str] | None = None, max_new_tokens: int | None = None,
                     upstream_max_tokens: int | None = None) -> AdapterSettings:
    """Settings for ``adapter`` (a PEFT folder, or None for the base model); each keyword that
    is not None overrides what the folder and its run config say (see the module docstring)."""
    from rl.config import Config, load_config

    config, run_config, lora = Config(), None, None
    if adapter is not None:
        path = Path(adapter)
        if (path / "adapter" / "adapter_config.json").is_file():  # a training checkpoint, step_X/adapter
            path = path / "adapter"
        if not (path / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{path}: not an adapter folder (no adapter_config.json)")
        lora = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        run_config = find_run_config(path)
        if run_config is not None:
            config = load_config(run_config)
    model = base_model or (config.model.name_or_path if run_config else None)
    if model is None and lora is not None:
        recorded = lora.get("base_model_name_or_path")
        model = recorded if recorded and Path(recorded).is_dir() else "embedded"
    rank, alpha, targets = 1, 1.0, "all-linear"
    if lora is not None:
        rank, alpha = int(lora["r"]), float(lora["lora_alpha"])
        if lora.get("use_rslora"):  # the engine scales by alpha / r; rsLoRA by alpha / sqrt(r)
            alpha *= math.sqrt(rank)
        found = lora["target_modules"]
        targets = found if isinstance(found, str) else tuple(sorted(found))
    return AdapterSettings(
        path=None if adapter is None else path, base_model=model or "embedded",
        lora_rank=rank, lora_alpha=alpha, target_modules=targets,
        condition=condition or config.data.condition,
        response_prefix=(config.rollout.response_prefix or "") if response_prefix is None else response_prefix,
        stop=tuple(config.rollout.stop if stop is None else stop),
        max_new_tokens=max_new_tokens or (config.eval.max_new_tokens if run_config else DEFAULT_MAX_NEW_TOKENS),
        upstream_max_tokens=upstream_max_tokens or (config.upstream.max_tokens if run_config else None),
        run_config=run_config, answer_format=config.data.answer_format,
        thinking=config.model.chat_template_thinking)


def build_engine(settings: AdapterSettings, *, device: str = "cpu"):
    """An :class:`~actors.rollout_hf.HFRolloutEngine` with the adapter loaded (or none)."""
    from actors.rollout_hf import HFRolloutEngine

    engine = HFRolloutEngine(settings.base_model, lora_rank=settings.lora_rank, lora_alpha=settings.lora_alpha,
                             target_modules=settings.target_modules, init_adapter=settings.path, device=device)
    if settings.path is None:  # lora_B is 0 already; disabled layers also skip the LoRA matmuls
        engine.model.disable_adapter_layers()
    return engine


def chain_from_adapter(upstream: Any, adapter: str | Path | None, *, device: str = "cpu",
                       **overrides) -> Chain:
    """A :class:`Chain` over ``upstream`` and the adapter at ``adapter`` (None: the base model);
    ``overrides`` go to :func:`adapter_settings`."""
    settings = adapter_settings(adapter, **overrides)
    engine = build_engine(settings, device=device)
    return Chain(upstream, engine, condition=settings.condition, response_prefix=settings.response_prefix,
                 max_new_tokens=settings.max_new_tokens, stop=settings.stop,
                 upstream_max_tokens=settings.upstream_max_tokens, model=settings.base_model,
                 answer_format=settings.answer_format, thinking=settings.thinking,
                 adapter=None if settings.path is None else str(settings.path))
