"""`api-adapter sft` end to end on a tiny model with the embedded tokenizer (CPU, in-process):
rationale SFT checkpoints, a run killed with SIGKILL after a checkpoint resumes with
checkpoint.resume and ends with the adapter of a run that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scripts import sft
from tests.tiny import build_chat_llama

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6


def _data(folder: Path) -> dict:
    rows = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
            for a, b in ((2, 3), (4, 1), (6, 2), (3, 3), (5, 4))]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[3:]))
    rationale = [{"prompt": f"Problem: {a} plus {b}?\nSolution:", "completion": f"\n{a} + {b} = {a + b}\n#### {a + b}"}
                 for a, b in ((2, 3), (4, 1), (6, 2), (3, 3), (1, 1), (7, 2))]
    (folder / "rationale.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rationale))
    return {"train": folder / "train.jsonl", "test": folder / "test.jsonl", "rationale": folder / "rationale.jsonl"}


def _argv(model: Path, data: dict, run: Path, *extra: str) -> list[str]:
    sets = [f"model.name_or_path={model}", "data.task=gsm8k", f"data.train_path={data['train']}",
            f"data.test_path={data['test']}", f"sft.data_path={data['rationale']}", f"sft.steps={STEPS}",
            "sft.batch_size=2", "sft.lr=0.01", "lora.rank=4", "lora.alpha=8", "cluster.mode=in_process",
            "checkpoint.every_steps=2", "checkpoint.keep_last=0", "eval.at_start=false", "eval.max_new_tokens=4",
            "rollout.max_new_tokens=4", f"logging.run_dir={run}", *extra]
    return [arg for item in sets for arg in ("--set", item)]


def _adapter(run: Path) -> dict:
    return load_file(run / "sft" / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_a_killed_sft_run_resumes_to_the_uninterrupted_adapter(tmp_path):
    model = build_chat_llama(tmp_path / "model")
    data = _data(tmp_path)
    straight = tmp_path / "straight"
    assert sft.main(_argv(model, data, straight)) == 0
    metrics = [json.loads(line) for line in (straight / "sft_metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(STEPS))
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["latest", "step_000002",
                                                                          "step_000004", "step_000006"]
    assert (straight / "checkpoints" / "latest").read_text().strip() == "step_000006"

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "sft.py"), *_argv(model, data, killed)],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (killed / "checkpoints" / "step_000002" / "meta.json").is_file():
            assert child.poll() is None and time.monotonic() < deadline, "no step-2 checkpoint"
            time.sleep(0.2)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    done = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert done and done[-1] != "step_000006" and not (killed / "sft" / "adapter").exists()

    assert sft.main(_argv(model, data, killed, "checkpoint.resume=true")) == 0
    resumed = [json.loads(line) for line in (killed / "sft_metrics.jsonl").read_text().splitlines()]
    assert resumed[-1]["step"] == STEPS - 1
    expected, got = _adapter(straight), _adapter(killed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
