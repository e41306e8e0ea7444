"""A local Hugging Face model as the upstream, in-process: no credentials, no network.

Requests are micro-batched: each :meth:`LocalProvider.call` puts its request on a queue, and
one worker task takes whatever is waiting (up to ``batch_size``) and generates for all of it
at once in a thread (``asyncio.to_thread``), so the event loop keeps serving the cache and
the progress bar. Generation is greedy, through the tokenizer's chat template (system + user
turn), left-padded; a batch generates up to its largest ``max_tokens`` and each row is cut to
its own (greedy decoding makes that the same as generating it alone, up to numerics).
A failed generation is a permanent failure of the batch's requests (no retry).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from actors.upstream.base import Provider, Reply, RetryPolicy, UpstreamError, UpstreamRequest

DEFAULT_LOCAL_MODEL = "embedded"
DEFAULT_BATCH_SIZE = 32


class LocalProvider(Provider):
    """``model``: ``"embedded"`` (SmolLM2-135M-Instruct) or a local model folder, loaded on the
    first call. ``threads``, when given, sets torch's CPU threads for the process until
    :meth:`aclose` (on a busy machine one thread can beat two that wait for each other).
    ``endpoint`` names the resolved folder, whose name carries the embedded model's
    fingerprint, so a changed model gets fresh cache keys."""

    name = "local"

    def __init__(
        self,
        model: str = DEFAULT_LOCAL_MODEL,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        device: str = "cpu",
        threads: int | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        from actors.models import resolve_model_path

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.path: Path = resolve_model_path(model)
        self.endpoint = f"local:{self.path.name if model == 'embedded' else self.path}"
        self.batch_size = batch_size
        self.device = device
        self.threads = threads
        self.retry = retry or RetryPolicy(max_attempts=1)
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._lm: Any = None
        self._tokenizer: Any = None
        self._threads_before: int | None = None

    async def call(self, request: UpstreamRequest) -> Reply:
        if request.temperature not in (None, 0, 0.0):
            raise UpstreamError("the local provider decodes greedily: temperature must be None or 0",
                                retryable=False)
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work(self._queue))
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((request, future))
        return await future

    async def _work(self, queue: asyncio.Queue) -> None:
        while True:
            batch = [await queue.get()]
            await asyncio.sleep(0)  # let requests issued in the same tick join this batch
            while len(batch) < self.batch_size and not queue.empty():
                batch.append(queue.get_nowait())
            batch = [(r, f) for r, f in batch if not f.done()]  # drop cancelled callers
            if not batch:
                continue
            try:
                replies = await asyncio.to_thread(self._generate, [r for r, _ in batch])
            except Exception as error:  # noqa: BLE001 - becomes each caller's recorded failure
                failure = UpstreamError(f"local generation failed: {type(error).__name__}: {error}",
                                        retryable=False)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(failure)
                continue
            for (_, future), reply in zip(batch, replies):
                if not future.done():
                    future.set_result(reply)

    def _load(self) -> None:
        from actors.models import load_causal_lm, load_tokenizer

        if self.threads is not None:
            import torch

            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        self._tokenizer = load_tokenizer(self.path)
        self._tokenizer.padding_side = "left"
        self._lm = load_causal_lm(self.path, device=self.device)

    def _generate(self, requests: list[UpstreamRequest]) -> list[Reply]:
        import torch
        from transformers import GenerationConfig

        if self._lm is None:
            self._load()
        tok = self._tokenizer
        texts = [
            tok.apply_chat_template(
                ([{"role": "system", "content": r.system}] if r.system else [])
                + [{"role": "user", "content": r.prompt}],
                add_generation_prompt=True, tokenize=False,
            )
            for r in requests
        ]
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        eos = self._lm.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tok.eos_token_id}
        config = GenerationConfig(
            max_new_tokens=max(r.max_tokens for r in requests), do_sample=False,
            eos_token_id=sorted(i for i in eos_ids if i is not None), pad_token_id=tok.pad_token_id,
        )
        with torch.inference_mode():
            output = self._lm.generate(**batch, generation_config=config)
        new_tokens = output[:, batch["input_ids"].shape[1]:].tolist()
        prompt_lengths = batch["attention_mask"].sum(dim=1).tolist()
        return [self._reply(row[: r.max_tokens], eos_ids, n_in)
                for row, r, n_in in zip(new_tokens, requests, prompt_lengths)]

    def _reply(self, tokens: list[int], eos_ids: set, n_in: int) -> Reply:
        cut = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
        kept = tokens if cut is None else tokens[:cut]
        text = self._tokenizer.decode(kept, skip_special_tokens=True)
        return Reply(text=text, stop_reason="max_tokens" if cut is None else "end_turn",
                     input_tokens=int(n_in), output_tokens=len(kept) + (cut is not None))

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        self._lm = self._tokenizer = None
        if self._threads_before is not None:  # give the process its thread count back
            import torch

            torch.set_num_threads(self._threads_before)
            self._threads_before = None

