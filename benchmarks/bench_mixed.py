"""Heavy requests beside light ones: does a client asking for a lot stall everyone else?

``convserve serve`` with default settings and the default 28x28 model. First the light load
alone: plain ``POST /predict`` of one PNG (wrk, 4 connections) and ``GET /healthz`` (wrk,
1 connection), at the same time, for ``--seconds``: their unloaded p99. Then, for each heavy
mix, the same two loads again while wrk sends the heavy request on 8 more connections:

- maps-array: 64 PNGs, ``feature_maps=all&format=array`` (about 15 MB answered);
- 64-files: 64 PNGs, probabilities only;
- maps-png: one PNG, ``feature_maps=all&format=png`` (a tiled PNG per block);
- occlusion: 4 PNGs, ``explain=occlusion`` (about 170 model runs per image).

For each mix it prints the heavy requests answered per second with no light load (alone),
then, beside the light load, /healthz p99 (target at most 50 ms), plain /predict p99 over its
unloaded p99 (target at most 3), the heavy requests answered per second and how many were
refused per second (503 with Retry-After, the admission control; wrk sends the next one at
once, where a client would wait Retry-After), the heavy requests' median latency, and the
light loads' errors (none allowed). All in one run: the ratios are what a shared machine
can be trusted with.

Needs wrk (Debian: apt-get install wrk). Pass ``--env KEY=VALUE`` for other settings.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_serve import (  # noqa: E402
    BOUNDARY,
    Server,
    _post_lua,
    export_default,
    parse_wrk,
    upload_png,
    wrk_argv,
)

HEALTHZ_P99_MS = 50.0
PLAIN_P99_RATIO = 3.0


def _many(pngs: list[bytes]) -> bytes:
    parts = [
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="{i}.png"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        + png
        + b"\r\n"
        for i, png in enumerate(pngs)
    ]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def _pngs(n: int) -> list[bytes]:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


MIXES = {  # name: (images, query)
    "maps-array": (64, "feature_maps=all&format=array"),
    "64-files": (64, ""),
    "maps-png": (1, "feature_maps=all&format=png"),
    "occlusion": (4, "explain=occlusion"),
}


def _together(runs: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """wrk runs started at once; each one's report."""
    procs = {
        name: subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        for name, argv in runs.items()
    }
    return {name: parse_wrk(proc.communicate()[0]) for name, proc in procs.items()}


def measure(port: int, s: int, plain: Path, heavy: dict[str, Path]) -> None:
    light = {
        "plain": wrk_argv(port, plain, 4, s, "", "/predict"),
        "healthz": wrk_argv(port, None, 1, s, "", "/healthz"),
    }
    alone = _together(light)
    print(
        f"unloaded: plain /predict p99 {alone['plain']['p99']:.1f} ms "
        f"({alone['plain']['rps']:.0f} req/s), /healthz p99 {alone['healthz']['p99']:.1f} ms"
    )
    print(
        f"{'heavy mix':12s} {'healthz p99':>12s} {'plain p99':>10s} {'ratio':>6s} "
        f"{'heavy/s':>8s} {'503/s':>7s} {'heavy p50':>10s} {'light errors':>12s} "
        f"{'heavy/s alone':>13s}"
    )
    met = True
    for name, (_, query) in MIXES.items():
        load = wrk_argv(port, heavy[name], 8, s, query, "/predict", timeout=30)
        solo = _together({"heavy": load})["heavy"]
        got = _together({**light, "heavy": load})
        ratio = got["plain"]["p99"] / alone["plain"]["p99"]
        errors = got["plain"]["errors"] + got["healthz"]["errors"]
        ok = got["healthz"]["p99"] <= HEALTHZ_P99_MS and ratio <= PLAIN_P99_RATIO
        met = met and ok and errors == 0
        h = got["heavy"]
        answered = (h["requests"] - h["errors"]) / s
        print(
            f"{name:12s} {got['healthz']['p99']:10.1f}ms {got['plain']['p99']:8.1f}ms "
            f"{ratio:6.2f} {answered:8.1f} {h['non2xx'] / s:7.0f} {h['p50']:8.1f}ms "
            f"{errors:12.0f} {(solo['requests'] - solo['errors']) / s:13.1f}"
            f"  {'' if ok else 'MISSED'}"
        )
    print(
        f"targets: /healthz p99 <= {HEALTHZ_P99_MS:.0f} ms, plain p99 <= "
        f"{PLAIN_P99_RATIO:.0f}x unloaded, no light errors: {'met' if met else 'NOT met'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per point")
    parser.add_argument("--port", type=int, default=8785)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server")
    args = parser.parse_args()
    env = dict(kv.split("=", 1) for kv in args.env)
    with tempfile.TemporaryDirectory(prefix="bench-mixed-") as tmp:
        folder = Path(tmp)
        model = export_default(folder)
        kind = f"multipart/form-data; boundary={BOUNDARY}"
        plain = _post_lua(folder, "plain", _many([upload_png()]), kind)
        pngs = _pngs(64)
        heavy = {
            name: _post_lua(folder, name, _many(pngs[:n]), kind) for name, (n, _) in MIXES.items()
        }
        cli = str(Path(sys.executable).parent / "convserve")
        server = Server(
            "convserve",
            [cli, "serve"],
            {"CONVSERVE_MODEL_URI": str(model), "CONVSERVE_PORT": str(args.port), **env},
            args.port,
        )
        server.start(_many([upload_png()]), folder)
        try:
            measure(args.port, args.seconds, plain, heavy)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
