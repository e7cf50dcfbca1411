"""The server's metrics in Prometheus' text format (version 0.0.4): counters, gauges and histograms,
updated from the event loop and the worker thread."""

from __future__ import annotations

import math
import threading

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, labels
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name, help, labels=()):
        super().__init__(name, help, labels)
        self._values: dict[tuple, float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = tuple(str(labels[n]) for n in self.label_names)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels) -> float:
        return self._values.get(tuple(str(labels[n]) for n in self.label_names), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge(_Metric):
    """A value read when the metrics are rendered (`read`), or set."""

    kind = "gauge"

    def __init__(self, name, help, read=None):
        super().__init__(name, help)
        self._read = read
        self._value = 0.0

    def set(self, value: float) -> None:
        self._value = float(value)

    def value(self) -> float:
        return float(self._read()) if self._read is not None else self._value

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_number(self.value())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help, buckets):
        super().__init__(name, help)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._counts = [0] * len(self.buckets)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self._counts[i] += 1
            self._sum += value
            self._count += 1

    @property
    def count(self) -> int:
        return self._count

    def render(self) -> list[str]:
        with self._lock:
            counts, total, n = list(self._counts), self._sum, self._count
        lines = self.header()
        lines += [f'{self.name}_bucket{{le="{_number(b)}"}} {c}' for b, c in zip(self.buckets, counts)]
        return lines + [f"{self.name}_sum {_number(total)}", f"{self.name}_count {n}"]


_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    """What tops-serve exposes on GET /metrics (docs/serve.md#metrics)."""

    def __init__(self, queue_depth, queue_capacity: int, busy):
        p = "tops_serve_"
        self.requests = Counter(p + "requests_total", "Requests received, by endpoint.", ("endpoint",))
        self.responses = Counter(p + "responses_total", "Answers to chat completion and model requests, by HTTP "
                                 "status.", ("status",))
        self.errors = Counter(p + "errors_total", "Failed requests by kind (the error's code).", ("kind",))
        self.queue_depth = Gauge(p + "queue_depth", "Requests waiting for the model.", queue_depth)
        self.queue_capacity = Gauge(p + "queue_capacity", "Requests that may wait (--max-queue).",
                                    lambda: queue_capacity)
        self.busy = Gauge(p + "busy", "1 while a generation runs.", busy)
        self.queue_wait = Histogram(p + "queue_wait_seconds", "Time from a request's arrival to its generation's "
                                    "start.", _SECONDS)
        self.ttft = Histogram(p + "ttft_seconds", "Time from a request's arrival to its first token.", _SECONDS)
        self.decode = Histogram(p + "decode_seconds_per_token", "Decode time per token, per request.",
                                (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        self.duration = Histogram(p + "request_duration_seconds", "Time from a request's arrival to its answer's "
                                  "end.", _SECONDS)
        self.visual_kept = Histogram(p + "visual_tokens_kept", "Visual tokens the first decoder layer saw, per "
                                     "request.", (16, 32, 64, 128, 192, 256, 384, 576, 1152, 2304, 2880))
        self.visual = Counter(p + "visual_tokens_total", "Visual tokens of the requests' images, before and after "
                              "pruning.", ("stage",))
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens prefilled (kept visual tokens "
                                     "included).")
        self.completion_tokens = Counter(p + "completion_tokens_total", "Tokens generated.")

    def all(self):
        return [self.requests, self.responses, self.errors, self.queue_depth, self.queue_capacity, self.busy,
                self.queue_wait, self.ttft, self.decode, self.duration, self.visual_kept, self.visual,
                self.prompt_tokens, self.completion_tokens]

    def render(self) -> str:
        return "\n".join(line for metric in self.all() for line in metric.render()) + "\n"
