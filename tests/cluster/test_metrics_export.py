"""Step metrics reach Ray's metrics export (the Prometheus endpoint the dashboard and Grafana
read), from a real local Ray instance."""

import socket
import time
import urllib.request

import pytest
import ray

from cluster.metrics import RayMetricsSink, prometheus_name
from rl.metrics import FanOut, sinks_for


def test_metric_keys_become_distinct_prometheus_names():
    keys = ["reward/mean", "reward/symbol/θ", "reward/symbol/α", "reward/symbol/+", "reward/symbol/-",
            "reward/symbol/*", "reward/symbol//", "timing/rollout_wait", "eval/symbol/β"]
    names = [prometheus_name(k) for k in keys]
    assert names[:2] == ["api_adapter_reward_mean", "api_adapter_reward_symbol_theta"]
    assert len(set(names)) == len(names)
    assert all(n.replace("_", "").isalnum() and n.isascii() for n in names)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int, wanted: list[str], timeout_s: float = 30.0) -> dict[str, str]:
    """The exported lines of the ``wanted`` metric names, once all have appeared."""
    deadline, found = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        except OSError:
            body = ""
        for line in body.splitlines():
            for name in wanted:
                if line.startswith(name + "{"):
                    found[name] = line
        if len(found) == len(wanted):
            return found
        time.sleep(0.5)
    pytest.fail(f"not exported within {timeout_s} s: {sorted(set(wanted) - set(found))}")


@pytest.mark.slow
def test_on_ray_every_numeric_step_metric_is_exported_with_the_run_name(tmp_path):
    port = _free_port()
    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False, _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 500})
    try:
        sink = FanOut(sinks_for("jsonl", tmp_path), RayMetricsSink("exported"))  # as the trainer wires it
        sink.log(3, {"reward/mean": 0.25, "reward/symbol/θ": 0.5, "sample": {"completion": "x", "reward": 1.0}})
        lines = _scrape(port, ["ray_api_adapter_reward_mean", "ray_api_adapter_reward_symbol_theta",
                               "ray_api_adapter_step"])
    finally:
        ray.shutdown()
    assert all('run="exported"' in line for line in lines.values())
    assert lines["ray_api_adapter_reward_mean"].endswith(" 0.25")
    assert lines["ray_api_adapter_reward_symbol_theta"].endswith(" 0.5")
    assert lines["ray_api_adapter_step"].endswith(" 3.0")
    assert (tmp_path / "metrics.jsonl").is_file()  # the other sinks still get them
