"""Prometheus metrics, one registry per app. Names follow Triton's and BentoML's where they
fit: request counts and latency by route, queue time, batch size, inference time, the model
version served, reloads and refused versions.

With several worker processes (``PROMETHEUS_MULTIPROC_DIR`` set by ``run_server`` before they
start), every process writes its values to files in that folder and ``/metrics`` answers with
the sum over all of them, whichever process takes the scrape (prometheus_client's multiprocess
mode). ``convserve_model_info`` is then the maximum over the processes: 1 for each version some
process serves.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

_pid = os.getpid()


def process_id() -> int:
    """This process's id, read at import and again in a forked child: ``os.getpid`` is a
    system call (0.2 us on a virtual machine), and prometheus_client's multiprocess values
    ask for it at every change, a dozen times for one prediction."""
    return _pid


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def multiprocess_values() -> type:
    """prometheus_client's multiprocess value store, telling processes apart by
    ``process_id``: what its own choice (``values.get_value_class``) is, with ``os.getpid``."""
    return values.MultiProcessValue(process_identifier=process_id)  # type: ignore[no-any-return]


LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # *_created series only add noise to scrapes
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "convserve_http_requests",
            "HTTP requests by route, method and status code",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "convserve_http_request_duration_seconds",
            "HTTP request latency by route",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "convserve_inference_queue_duration_seconds",
            "Time an image waits for its batch to start",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_time = Histogram(
            "convserve_inference_compute_duration_seconds",
            "Time of one session.run",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "convserve_inference_batch_size",
            "Images per session.run",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.images = Counter("convserve_inference_images", "Images inferred", registry=r)
        self._model_metrics(r)
        self.rejected = Counter(
            "convserve_rejected_inputs",
            "Uploads or tensors refused with a 4xx, by reason",
            ["reason"],
            registry=r,
        )

    def _model_metrics(self, r: CollectorRegistry) -> None:
        """The models served: versions, memory, loads, evictions, refusals, fetch failures."""
        self.model_info = Gauge(
            "convserve_model_info",
            "The model version being served (1), and versions served before (0)",
            ["name", "version", "alias", "run_id", "providers"],
            registry=r,
            multiprocess_mode="max",
        )
        self._serving: dict[tuple[str, str], tuple[str, ...]] = {}  # (name, alias) -> labels
        self.model_memory = Gauge(
            "convserve_model_memory_bytes",
            "Resident memory a loaded model added to its process when it was loaded",
            ["name", "alias"],
            registry=r,
            multiprocess_mode="max",
        )
        self.reloads = Counter(
            "convserve_model_reloads", "Model versions loaded and put into service", registry=r
        )
        self.refused = Counter(
            "convserve_model_refused",
            "Model versions that failed to load or to pass the self-check and were not served",
            registry=r,
        )
        self.evictions = Counter(
            "convserve_model_evictions",
            "Models unloaded to keep within CONVSERVE_MODEL_MEMORY_MB",
            registry=r,
        )
        self.load_failures = Counter(
            "convserve_model_fetch_failures",
            "Failed fetches of a model version (registry or artifact store), tried again later",
            registry=r,
        )

    def serving(self, name: str, version: str, alias: str, run_id: str, providers: str) -> None:
        self.not_serving(name, alias)
        self._serving[name, alias] = (name, version, alias, run_id, providers)
        self.model_info.labels(*self._serving[name, alias]).set(1)

    def not_serving(self, name: str, alias: str) -> None:
        """0, not removed: another process's file keeps the series."""
        labels = self._serving.pop((name, alias), None)
        if labels is not None:
            self.model_info.labels(*labels).set(0)
            self.model_memory.labels(name, alias).set(0)

    def exposition(self) -> bytes:
        """The text format: this process's values, or every worker's summed."""
        if os.environ.get(MULTIPROCESS_DIR):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
