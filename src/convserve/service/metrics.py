"""Prometheus metrics, one registry per app. Names follow Triton's and BentoML's where they
fit: request counts and latency by route, queue time, batch size, inference time, the model
version served, reloads and refused versions."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

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
        self.model_info = Gauge(
            "convserve_model_info",
            "The model version being served (1)",
            ["name", "version", "alias", "run_id", "providers"],
            registry=r,
        )
        self.reloads = Counter(
            "convserve_model_reloads", "Model versions loaded and put into service", registry=r
        )
        self.refused = Counter(
            "convserve_model_refused",
            "Model versions that failed to load or to pass the self-check and were not served",
            registry=r,
        )
        self.load_failures = Counter(
            "convserve_model_fetch_failures",
            "Failed fetches of a model version (registry or artifact store), tried again later",
            registry=r,
        )
        self.rejected = Counter(
            "convserve_rejected_inputs",
            "Uploads or tensors refused with a 4xx, by reason",
            ["reason"],
            registry=r,
        )

    def serving(self, name: str, version: str, alias: str, run_id: str, providers: str) -> None:
        self.model_info.clear()
        self.model_info.labels(name, version, alias, run_id, providers).set(1)
