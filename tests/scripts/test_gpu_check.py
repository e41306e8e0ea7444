"""scripts/gpu_check.py without a GPU: its dry run on the CPU writes one JSON per step, each with
a status, a reason, the device, versions and timestamps; what needs a GPU is skipped with the
reason and everything else runs and passes. (~80 s on 2 idle cores.)"""

import json

import pytest

from scripts import gpu_check

STATUSES = {"pass", "fail", "skip"}


@pytest.mark.slow
def test_dry_run_writes_every_step_with_a_status(tmp_path):
    out = tmp_path / "gpu"
    rc = gpu_check.main(["--dry-run", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "dry_run" and set(summary["steps"]) == set(gpu_check.STEPS)
    assert summary["counts"]["fail"] == 0 and rc == 0, {n: s["reason"] for n, s in summary["steps"].items()}
    for name in gpu_check.STEPS:
        record = json.loads((out / f"{name}.json").read_text())
        assert record["step"] == name and record["status"] in STATUSES and record["reason"]
        assert record["device"].startswith("cpu") and record["versions"]["torch"]
        assert record["started"] <= record["finished"] and record["dry_run"] is True
    assert not (tmp_path / "results").exists()

    contract = json.loads((out / "contract.json").read_text())
    assert [e["counts"]["pass"] for e in contract["result"]["engines"]] == [2]
    assert contract["result"]["measurements"][0]["mean_abs_diff"] < 1e-3  # fp32 on the CPU

    sync = {p["name"]: p for p in json.loads((out / "weight_sync.json").read_text())["result"]["parts"]}
    for name in ("embedded:gloo:bench", "embedded:object_store:bench", "embedded:object_store:own"):
        assert sync[name]["status"] == "pass" and sync[name]["round_ms_median"] > 0
    assert sync["embedded:object_store:own"]["bit_exact"] is True
    gpu_only = [p for n, p in sync.items() if ":cuda_ipc:" in n or ":nccl:" in n]
    assert len(gpu_only) == 4 and all(p["status"] == "skip" and "GPU" in p["reason"] for p in gpu_only)

    training = json.loads((out / "training.json").read_text())
    assert training["status"] == "pass" and training["result"]["steps"] == 1
    assert training["result"]["s_per_step_median"] > 0 and training["result"]["policy_version"] == 1

    throughput = {p["name"]: p for p in json.loads((out / "throughput.json").read_text())["result"]["parts"]}
    assert throughput["hf"]["status"] == "pass" and throughput["hf"]["tokens_per_s_median"] > 0
    assert throughput["vllm"]["status"] in ("pass", "skip")  # skip: vLLM not installed


def test_a_dry_run_never_writes_into_results(capsys):
    assert gpu_check.main(["--dry-run"]) == 2
    assert gpu_check.main(["--dry-run", "--out", str(gpu_check.REPO / "results" / "gpu")]) == 2
    assert "outside results/" in capsys.readouterr().err


def test_unknown_steps_are_named(capsys):
    assert gpu_check.main(["--steps", "contract,trainig"]) == 2
    assert "trainig" in capsys.readouterr().err
    assert gpu_check.main(["--engines", "hf,vlm"]) == 2
    assert "vlm" in capsys.readouterr().err


def test_a_step_fails_if_any_part_failed_and_passes_with_skips():
    parts = [{"name": "a", "status": "pass", "reason": "ok"}, {"name": "b", "status": "skip", "reason": "no GPU"},
             {"name": "c", "status": "skip", "reason": "no GPU"}]
    assert gpu_check.outcome(parts) == ("pass", "1 passed; skipped b, c: no GPU")
    assert gpu_check.outcome(parts + [{"name": "d", "status": "fail", "reason": "boom"}]) == ("fail", "d: boom")
    assert gpu_check.outcome(parts[1:]) == ("skip", "skipped b, c: no GPU")


def test_pytest_outcome_reads_junit(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text('<testsuites><testsuite><testcase name="t1" time="1"/><testcase name="t2" time="2">'
                     '<failure message="assert 0.4 &gt;= 0.5"/></testcase><testcase name="t3">'
                     '<skipped message="needs a CUDA GPU"/></testcase></testsuite></testsuites>')
    got = gpu_check.pytest_outcome(1, junit, 3.0, tmp_path / "log")
    assert got["status"] == "fail" and got["reason"] == "1 failed: t2" and got["counts"] == {"pass": 1, "fail": 1, "skip": 1}
    assert gpu_check.pytest_outcome(None, tmp_path / "none.xml", 9.0, tmp_path / "log")["reason"] == "timed out after 9 s"
    junit.write_text('<testsuite><testcase name="t3"><skipped message="needs a CUDA GPU"/></testcase></testsuite>')
    assert gpu_check.pytest_outcome(0, junit, 1.0, tmp_path / "log")["status"] == "skip"


def test_training_numbers_read_the_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "time/train_seconds": t, "timing/sync": 0.1,
                                                                "sync/verified": 1, "policy_version": i + 1}) + "\n"
                                                    for i, t in enumerate([5.0, 6.0, 7.5])))
    log = tmp_path / "log"
    log.write_text("placement: ...\nweight sync: cuda_ipc\n")
    got = gpu_check.training_numbers(tmp_path, log)
    assert got["steps"] == 3 and got["s_per_step"] == [5.0, 1.0, 1.5] and got["s_per_step_median"] == 1.25
    assert got["transport"] == "cuda_ipc" and got["sync_verified"] == [1, 1, 1] and got["policy_version"] == 3
