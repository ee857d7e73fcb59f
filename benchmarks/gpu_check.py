"""The CUDA paths end to end, on a machine with an NVIDIA GPU (``benchmarks/gpu_check.sh``).

1. trains the default model with ``device: cuda`` (torch's CUDA build);
2. exports it (checked against torch, as every export is);
3. compares onnxruntime's CUDA provider with its CPU provider on validation images
   (probabilities within 1e-4) and prints images/s at batch 1 and 32 on both;
4. serves it with ``CONVSERVE_DEVICE=cuda`` (a real ``convserve serve`` process), checks that
   the CUDA provider is in use and that ``POST /predict`` answers the CPU provider's
   probabilities within 1e-4, and prints its requests/s at concurrency 1.

``--device cpu`` runs every step on the CPU instead (to check the script on a machine
without a GPU; its figures say nothing about a GPU). Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TOLERANCE = 1e-4


def providers(device: str) -> list[str]:
    if device == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def throughput(session, images: np.ndarray, batch: int, seconds: float) -> float:  # type: ignore[no-untyped-def]
    """Images/s of ``session.run`` at ``batch`` over about ``seconds``."""
    x = np.ascontiguousarray(images[:batch])
    for _ in range(5):
        session.run(["probabilities"], {"image": x})
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(["probabilities"], {"image": x})
        n += batch
    return n / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput figure")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="a config override"
    )
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from convserve.training.configfiles import load_config
    from convserve.training.data import load_data
    from convserve.training.export import ExportCheckFailed
    from convserve.training.run import train

    failures: list[str] = []
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), onnxruntime {ort.__version__}")
    print(f"onnxruntime providers: {', '.join(ort.get_available_providers())}")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("torch sees no CUDA device: install torch's CUDA build on a GPU machine")
            return 1
        print(f"GPU: {torch.cuda.get_device_name(0)}")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            print("onnxruntime has no CUDA provider: pip install 'onnxruntime-gpu[cuda,cudnn]'")
            return 1

    work = Path(tempfile.mkdtemp(prefix="convserve-gpu-check-"))
    cfg = load_config(
        "default",
        [
            f"device={args.device}",
            f"optim.max_steps={args.steps}",
            "tracking.enabled=false",
            f"tracking.output_dir={work}",
            *args.overrides,
        ],
    )
    start = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - start
    print(
        f"1. trained on {args.device}: {result.status}, {args.steps} steps in {seconds:.1f} s, "
        f"val_accuracy {result.metrics.get('val_accuracy', float('nan')):.4f}, "
        f"diagnosis {result.diagnosis.verdict}"
    )
    if result.status != "finished" or result.best_checkpoint is None:
        return 1

    from convserve.pipelines.registry import Policy, publish

    onnx_path = work / "model.onnx"
    try:
        published = publish(
            checkpoint=result.best_checkpoint,
            output=onnx_path,
            policy=Policy(register=False, promote=False),
            tracking_uri=f"sqlite:///{work / 'mlflow.db'}",
        )
    except ExportCheckFailed as err:
        print(f"2. export refused: {err}")
        return 1
    print(f"2. exported and checked against torch: max |diff| {published.parity.worst:.2e}")

    data = load_data(cfg.data, cfg.seed, None)
    assert data.val.images is not None  # the default data set is held in memory, as uint8
    images = (data.val.images[:256].float() / 255).numpy()
    cpu = ort.InferenceSession(str(onnx_path), providers=providers("cpu"))
    dev = ort.InferenceSession(str(onnx_path), providers=providers(args.device))
    if args.device == "cuda" and "CUDAExecutionProvider" not in dev.get_providers():
        failures.append(f"the CUDA session fell back to {dev.get_providers()}")
    want = cpu.run(["probabilities"], {"image": images})[0]
    got = dev.run(["probabilities"], {"image": images})[0]
    diff = float(np.abs(want - got).max())
    print(f"3. onnxruntime {args.device} vs CPU on {len(images)} images: max |diff| {diff:.2e}")
    if diff > TOLERANCE:
        failures.append(f"{args.device} and CPU probabilities differ by {diff:.2e}")
    print("   images/s   batch 1   batch 32")
    for name, session in (("cpu", cpu), (args.device, dev)):
        one = throughput(session, images, 1, args.seconds)
        many = throughput(session, images, 32, args.seconds)
        print(f"   {name:<8} {one:9.0f} {many:10.0f}")

    failures += serve_check(onnx_path, images, want, args.device, args.seconds)
    for failure in failures:
        print(f"FAILED: {failure}")
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


def serve_check(
    onnx_path: Path, images: np.ndarray, want: np.ndarray, device: str, seconds: float
) -> list[str]:
    """``convserve serve`` with ``CONVSERVE_DEVICE``: the provider in use, the answers and
    requests/s at concurrency 1."""
    import socket

    import httpx
    from PIL import Image

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "CONVSERVE_MODEL_URI": str(onnx_path),
        "CONVSERVE_DEVICE": device,
        "CONVSERVE_PORT": str(port),
        "CONVSERVE_HOST": "127.0.0.1",
        "CONVSERVE_WORKERS": "1",
    }
    cli = [sys.executable, "-m", "convserve.cli", "serve"]
    log = onnx_path.with_name("serve.log")
    failures = []
    with open(log, "wb") as out:
        proc = subprocess.Popen(cli, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                return [f"convserve serve exited {proc.returncode}: {log.read_text()[-2000:]}"]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                return ["convserve serve was not ready within 120 s"]
            time.sleep(0.3)
        model = httpx.get(f"{url}/v1/model").json()
        in_use, labels = model["providers"], model["labels"]
        print(f"4. convserve serve, CONVSERVE_DEVICE={device}: providers {in_use}")
        if device == "cuda" and in_use[0] != "CUDAExecutionProvider":
            failures.append(f"the service runs on {in_use}")
        worst = 0.0
        with httpx.Client(base_url=url, timeout=30) as http:
            for i in range(16):
                buf = io.BytesIO()
                Image.fromarray((images[i, 0] * 255).round().astype(np.uint8)).save(buf, "PNG")
                r = http.post(
                    "/predict", params={"fit": "none"}, files={"file": ("x.png", buf.getvalue())}
                )
                r.raise_for_status()
                answer = r.json()["predictions"][0]["probabilities"]
                got = np.array([answer[label] for label in labels])
                # the PNG is 8-bit: compare with the CPU provider on the same 8-bit image
                exact = np.round(images[i : i + 1] * 255) / 255
                cpu = _cpu(onnx_path).run(["probabilities"], {"image": exact.astype(np.float32)})
                worst = max(worst, float(np.abs(cpu[0][0] - got).max()))
            n, start = 0, time.perf_counter()
            body = buf.getvalue()
            while time.perf_counter() - start < seconds:
                http.post("/predict", params={"fit": "none"}, files={"file": ("x.png", body)})
                n += 1
            rate = n / (time.perf_counter() - start)
        print(
            f"   /predict vs CPU provider, 16 images: max |diff| {worst:.2e}; "
            f"{rate:.0f} req/s at concurrency 1"
        )
        if worst > TOLERANCE:
            failures.append(f"/predict differs from the CPU provider by {worst:.2e}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return failures


_sessions: dict[Path, object] = {}


def _cpu(path: Path):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    if path not in _sessions:
        _sessions[path] = ort.InferenceSession(str(path), providers=providers("cpu"))
    return _sessions[path]


if __name__ == "__main__":
    sys.exit(main())
