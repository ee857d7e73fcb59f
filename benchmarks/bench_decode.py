"""Decoding hostile images in a real ``convserve serve`` process: memory and the event loop.

1. Peak memory: the worst image under the default pixel limit (40 million pixels), a 16-bit
   grey 6300x6300 PNG of about 80 KB, sent alone and then 8 at once. Prints the server's peak
   RSS (VmHWM) above its idle RSS, the RSS left afterwards, and the ratio of the peak growth
   to the pixel limit at 8 bits per channel (40 MB): the bound the decoder keeps to.
2. The event loop: /healthz and a small image's /predict latency (p50, p99) idle, and while
   two clients loop on a 24 KB grey 5000x5000 PNG; printed as the ratio loaded/idle.

Run: .venv/bin/python benchmarks/bench_decode.py
"""

from __future__ import annotations

import io
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_serve import export_default
from tests.servers import free_port, process, wait_http


def status_mb(pid: int, key: str) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def worst_image() -> bytes:
    """16-bit grey, 6300 x 6300 = 39.7 million pixels: just under the default limit."""
    array = np.zeros((6300, 6300), np.uint16)
    array[1000:5300, 2900:3400] = 60000  # a digit-like bar, so the fit has ink to crop
    return png(array)


def latencies(url: str, files: dict | None, seconds: float) -> list[float]:
    out = []
    with httpx.Client(timeout=30) as http:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.perf_counter()
            if files is None:
                http.get(f"{url}/healthz")
            else:
                http.post(f"{url}/predict", files=files)
            out.append((time.perf_counter() - start) * 1e3)
            time.sleep(0.01)
    return out


def p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    model = export_default(folder)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CONVSERVE_MODEL_URI": str(model), "CONVSERVE_PORT": str(port)}
    cli = str(Path(sys.executable).parent / "convserve")
    with process([cli, "serve"], folder / "serve.log", env, folder) as proc:
        wait_http(f"{url}/readyz", proc, 60)
        small = {"file": ("s.png", png(np.full((28, 28), 200, np.uint8)))}
        httpx.post(f"{url}/predict", files=small)
        idle = status_mb(proc.pid, "VmRSS")
        worst = worst_image()
        r = httpx.post(f"{url}/predict", files={"file": ("w.png", worst)}, timeout=120)
        alone_peak = status_mb(proc.pid, "VmHWM")
        time.sleep(1)
        alone_after = status_mb(proc.pid, "VmRSS")
        with ThreadPoolExecutor(8) as pool:
            codes = list(
                pool.map(
                    lambda _: (
                        httpx.post(
                            f"{url}/predict", files={"file": ("w.png", worst)}, timeout=120
                        ).status_code
                    ),
                    range(8),
                )
            )
        eight_peak = status_mb(proc.pid, "VmHWM")
        time.sleep(1)
        eight_after = status_mb(proc.pid, "VmRSS")
        bound = 40.0  # MB: 40 million pixels at one byte
        print(f"worst image: {len(worst) / 1e3:.0f} KB PNG, 6300x6300 16-bit grey, {r.status_code}")
        print(f"idle RSS {idle:.0f} MB")
        print(
            f"alone:    peak +{alone_peak - idle:.0f} MB ({(alone_peak - idle) / bound:.2f}x the "
            f"40 MB bound), {alone_after - idle:+.0f} MB after"
        )
        print(
            f"8 at once: peak +{eight_peak - idle:.0f} MB ({(eight_peak - idle) / bound:.2f}x), "
            f"{eight_after - idle:+.0f} MB after; answers {sorted(codes)}"
        )

        big = {"file": ("g.png", png(np.full((5000, 5000), 90, np.uint8)))}
        health_idle = latencies(url, None, 3)
        predict_idle = latencies(url, small, 3)
        stop = threading.Event()

        def loop() -> None:
            with httpx.Client(timeout=60) as http:
                while not stop.is_set():
                    http.post(f"{url}/predict", files=big)

        clients = [threading.Thread(target=loop) for _ in range(2)]
        for t in clients:
            t.start()
        time.sleep(0.5)
        health_loaded = latencies(url, None, 5)
        predict_loaded = latencies(url, small, 5)
        stop.set()
        for t in clients:
            t.join()
        for name, a, b in (
            ("/healthz", health_idle, health_loaded),
            ("small /predict", predict_idle, predict_loaded),
        ):
            print(
                f"{name}: idle p50 {p(a, 50):.1f} / p99 {p(a, 99):.1f} ms; with two clients "
                f"looping on 5000x5000 PNGs p50 {p(b, 50):.1f} / p99 {p(b, 99):.1f} ms "
                f"(p99 ratio {p(b, 99) / p(a, 99):.1f}); {statistics.mean(b):.1f} ms mean"
            )


if __name__ == "__main__":
    main()
