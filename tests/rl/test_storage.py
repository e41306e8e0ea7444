"""Runs and checkpoints in an object store (rl/storage.py, rl/checkpoint.py), against a real
S3-protocol server (moto's, tests/s3_server.py): ordered commits, a writer SIGKILLed
mid-upload, resume from a fresh local folder."""

import doctest
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rl import storage
from rl.checkpoint import CheckpointError, CheckpointManager, read_meta
from rl.storage import Store, StorageError, is_remote, pull_run_files, sync_run_files
from tests.s3_server import S3Server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        server.make_bucket("runs")
        yield server


@pytest.fixture
def where(request) -> str:
    """A fresh location in the bucket, one per test."""
    return f"s3://runs/{request.node.name.replace('[', '-').replace(']', '')}-{time.time_ns()}"


def _write(files: dict[str, bytes]):
    def write(folder: Path) -> None:
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
    return write


def test_doctests():
    assert doctest.testmod(storage).failed == 0


def test_a_store_reads_writes_lists_and_deletes(s3, where):
    store = Store(where)
    store.write_bytes("a/b.txt", b"one")
    store.write_bytes("a/c/d.txt", b"two")
    assert store.read_bytes("a/b.txt") == b"one" and store.is_file("a/b.txt") and not store.is_file("a")
    assert store.folders() == ["a"] and store.folders("a") == ["c"] and store.folders("nothing") == []
    assert store.files("a") == ["b.txt", "c/d.txt"]
    store.delete("a")
    assert store.files() == [] and not store.is_folder("a")
    store.delete("a")  # nothing there: no error
    with pytest.raises(StorageError, match=f"{where}/gone"):
        store.read_bytes("gone")


def test_a_checkpoint_in_a_bucket_commits_meta_then_marker_and_prunes(s3, where, tmp_path):
    manager = CheckpointManager(f"{where}/checkpoints", keep_last=2, staging=tmp_path / "staging")
    s3.clear_puts()
    saved = manager.save(1, _write({"adapter/adapter_model.safetensors": b"w1", "learner_state.pt": b"s1"}),
                         {"data_position": 4})
    assert saved == f"{where}/checkpoints/step_000001"
    keys = [k.rsplit("/checkpoints/", 1)[1] for k in s3.puts() if "/checkpoints/" in k]
    assert keys[-2:] == ["step_000001/meta.json", "latest"]  # every file before meta.json, the marker last
    assert set(keys[:-2]) >= {"step_000001/adapter/adapter_model.safetensors", "step_000001/learner_state.pt"}
    for step in (2, 3):
        manager.save(step, _write({"learner_state.pt": f"s{step}".encode()}), {"data_position": 4 * step})
    assert [s for s, _ in manager.complete()] == [2, 3]  # keep_last=2 pruned step 1
    assert manager.latest() == f"{where}/checkpoints/step_000003"
    assert list((tmp_path / "staging").iterdir()) == []  # what was made locally went up and away

    fresh = CheckpointManager(f"{where}/checkpoints", keep_last=2, staging=tmp_path / "elsewhere")
    local = fresh.resolve(True)
    assert local == tmp_path / "elsewhere" / "step_000003" and read_meta(local)["data_position"] == 12
    assert (local / "learner_state.pt").read_bytes() == b"s3"
    assert fresh.origin[local] == f"{where}/checkpoints/step_000003"
    assert (fresh.resolve("step_000002") / "learner_state.pt").read_bytes() == b"s2"
    assert read_meta(fresh.resolve(f"{where}/checkpoints/step_000002"))["step"] == 2
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        fresh.resolve(f"{where}/checkpoints/step_000009")
    assert CheckpointManager(f"{where}/empty", 1, staging=tmp_path / "e").resolve(True) is None


_KILLED_WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from rl.checkpoint import CheckpointManager

    def write(step):
        def fill(folder):
            for name in ("a.bin", "b.bin", "c.bin"):
                (folder / name).write_bytes(f"{name}{step}".encode())
        return fill

    manager = CheckpointManager(sys.argv[1], keep_last=0, staging=Path(sys.argv[2]))
    manager.save(1, write(1), {"data_position": 1})
    print("saved 1", flush=True)
    manager.save(2, write(2), {"data_position": 2})  # stalled by the server, then SIGKILLed
""")


@pytest.mark.slow
def test_a_writer_killed_mid_upload_leaves_the_last_complete_checkpoint(s3, where, tmp_path):
    """The process saving step 2 is SIGKILLed after its first file reached the bucket: step 2
    is a folder without meta.json, which nothing reads; the latest is step 1, on a fresh
    folder elsewhere; saving step 2 again replaces the leftover."""
    root = f"{where}/checkpoints"
    s3.stall(on="/step_000002/", nth=2)
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, root, str(tmp_path / "w")], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert s3.wait_stalled(60), "the writer never reached step 2's second file"
        writer.send_signal(signal.SIGKILL)
        writer.wait(30)
    finally:
        s3.release()
        writer.kill()
    assert writer.stdout.read().strip() == "saved 1"
    store = Store(root)
    assert store.files("step_000002") == ["a.bin"]  # half an upload
    manager = CheckpointManager(root, keep_last=0, staging=tmp_path / "resumer")
    assert [s for s, _ in manager.complete()] == [1] and manager.latest() == f"{root}/step_000001"
    assert read_meta(manager.resolve(True))["data_position"] == 1
    with pytest.raises(CheckpointError, match="its save never finished"):
        manager.resolve("step_000002")
    manager.save(2, _write({"z.bin": b"z"}), {"data_position": 2})
    assert store.files("step_000002") == ["meta.json", "z.bin"] and manager.latest() == f"{root}/step_000002"


def test_run_files_go_up_and_come_back_without_checkpoints(s3, where, tmp_path):
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "report/report.md", "upstream_cache.sqlite",
                 "upstream_cache.sqlite-journal", "checkpoints/step_000001/meta.json"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(name)
    (run / "upstream_cache.sqlite").unlink()
    with sqlite3.connect(run / "upstream_cache.sqlite") as db:  # a WAL database with a committed row
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("CREATE TABLE t (x)")
        db.execute("INSERT INTO t VALUES (42)")
        db.commit()  # in the -wal file, not yet in the database file
        sync_run_files(run, where)
    assert Store(where).files() == ["config.yaml", "metrics.jsonl", "report/report.md", "upstream_cache.sqlite"]
    pull_run_files(where, tmp_path / "back")
    assert (tmp_path / "back" / "metrics.jsonl").read_text() == "metrics.jsonl"
    assert not (tmp_path / "back" / "checkpoints").exists()
    with sqlite3.connect(tmp_path / "back" / "upstream_cache.sqlite") as db:
        assert db.execute("SELECT x FROM t").fetchall() == [(42,)]
    sync_run_files(run, str(tmp_path / "local"))  # a local run: nothing to copy
    assert not (tmp_path / "local").exists()


def test_a_location_that_cannot_be_opened_names_itself():
    assert is_remote("s3://b/x") and not is_remote("file:///x")
    with pytest.raises(StorageError, match="nosuch://b/x"):
        Store("nosuch://b/x")


@pytest.mark.slow
def test_a_run_in_a_bucket_resumes_from_a_fresh_local_folder(s3, where, tmp_path):
    """train.py with logging.run_dir in the bucket: two steps, checkpointed; then the same
    command with checkpoint.resume=true from another local folder (another host's disk)
    resumes from the bucket and goes on; the run's metrics and results end up in the bucket."""
    from scripts.train import main

    common = ["--config", str(ROOT / "configs" / "smoke.yaml"), "--set", f"logging.run_dir={where}",
              "--set", "cluster.mode=in_process", "--set", "checkpoint.every_steps=1", "--set", "eval.at_start=false",
              "--set", "eval.n_items=2", "--set", "algorithm.filter_zero_variance=false"]
    assert main([*common, "--set", "algorithm.steps=1", "--set", f"logging.local_dir={tmp_path / 'a'}"]) == 0
    store = Store(where)
    assert store.read_bytes("checkpoints/latest") == b"step_000001"
    assert main([*common, "--set", "algorithm.steps=2", "--set", "checkpoint.resume=true",
                 "--set", f"logging.local_dir={tmp_path / 'b'}"]) == 0
    results = json.loads(store.read_bytes("results.json"))
    assert results["run_dir"] == where and results["resumed_from_step"] == 1 and results["steps"] == 2
    rows = [json.loads(line) for line in store.read_bytes("metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]  # the first host's step, then the resumed one
    assert store.read_bytes("checkpoints/latest") == b"step_000002"
    assert "report.md" in " ".join(store.files())
