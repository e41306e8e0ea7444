"""Step metrics into Ray's metrics system (the dashboard's Metrics tab, Prometheus, Grafana)."""

from __future__ import annotations

import re
import unicodedata

_OPERATOR_NAMES = {"+": "plus", "-": "minus", "*": "times", "/": "div"}


def prometheus_name(key: str) -> str:
    """``reward/symbol/θ`` -> ``api_adapter_reward_symbol_theta``: a metric key as a Prometheus
    name (letters, digits, ``_``). A symbol (what follows ``symbol/``) is spelled out, operators
    and letters outside ASCII by name, so that distinct keys stay distinct (Ray adds its own
    ``ray_`` prefix on export)."""
    def spell(text: str, operators: bool) -> str:
        def one(ch: str) -> str:
            if operators and ch in _OPERATOR_NAMES:
                return _OPERATOR_NAMES[ch]
            if ch.isascii():
                return "_"
            return unicodedata.name(ch, "x").split()[-1].lower()

        return re.sub(r"[^A-Za-z0-9_]", lambda m: one(m.group()), text)

    head, marker, symbol = key.partition("symbol/")
    name = spell(head, False) + ("symbol_" + spell(symbol, True) if marker else "")
    return "api_adapter_" + name


class RayMetricsSink:
    """Every numeric metric as a ``ray.util.metrics.Gauge`` tagged with the run's name: Ray's
    metrics agent exports them with the cluster's own (``ray_api_adapter_reward_mean{run=...}``
    on the node's Prometheus endpoint), which the dashboard's Metrics tab and Grafana read."""

    def __init__(self, run_name: str):
        self.run_name, self.gauges = run_name, {}

    def log(self, step: int, metrics: dict) -> None:
        from ray.util.metrics import Gauge

        for key, value in {"step": step, **metrics}.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if key not in self.gauges:
                    about = key.encode("ascii", "backslashreplace").decode()  # Ray takes ASCII only
                    gauge = Gauge(prometheus_name(key), description=about, tag_keys=("run",))
                    self.gauges[key] = gauge.set_default_tags({"run": self.run_name})
                self.gauges[key].set(float(value))
