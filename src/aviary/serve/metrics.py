"""Counters, gauges and histograms in the Prometheus text format, safe to update from any thread.

No client library: the exposition format is a few lines of text, and the server needs a dozen series.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["Metrics"]

# seconds; wide enough for a tiny model on a CPU and a large one on a GPU
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
               for k, v in sorted(labels.items()))
    return "{" + ",".join(escaped) + "}"


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
        self.sum += value
        self.count += 1


class Metrics:
    """`inc("aviary_requests_total", status="ok")`, `observe("aviary_ttft_seconds", 0.1)`, `render()`.

    Gauges are read at render time from callables registered with `gauge(name, help, fn)`.
    """

    def __init__(self, prefix: str = "aviary_"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}  # name -> (type, help)
        self._counters: dict[str, dict[tuple, float]] = {}
        self._histograms: dict[str, _Histogram] = {}
        self._gauges: dict[str, Callable[[], float]] = {}

    def counter(self, name: str, help: str) -> None:
        self._help[name] = ("counter", help)
        self._counters.setdefault(name, {})

    def histogram(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self._help[name] = ("histogram", help)
        self._histograms[name] = _Histogram(buckets)

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        self._help[name] = ("gauge", help)
        self._gauges[name] = read

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0) + value

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self._histograms[name].observe(value)

    def value(self, name: str, **labels: str) -> float:
        """A counter's current value (for tests and logs)."""
        with self._lock:
            return self._counters[name].get(tuple(sorted(labels.items())), 0)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, help) in self._help.items():
                full = self.prefix + name
                lines += [f"# HELP {full} {help}", f"# TYPE {full} {kind}"]
                if kind == "counter":
                    for key, v in sorted(self._counters[name].items()):
                        lines.append(f"{full}{_labels(dict(key))} {v:g}")
                elif kind == "gauge":
                    lines.append(f"{full} {float(self._gauges[name]()):g}")
                else:
                    h = self._histograms[name]
                    for edge, c in zip(h.buckets, h.counts, strict=True):
                        lines.append(f'{full}_bucket{{le="{edge:g}"}} {c}')
                    lines += [f'{full}_bucket{{le="+Inf"}} {h.count}', f"{full}_sum {h.sum:.6f}",
                              f"{full}_count {h.count}"]
        return "\n".join(lines) + "\n"
