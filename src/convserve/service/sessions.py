"""onnxruntime sessions as the service opens them: the providers for a device (the CUDA
libraries loaded once), operator threads that sleep when idle, every graph optimisation.
Imports onnxruntime alone, so that a process that only runs a model (``shadow_run``) stays
small."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort


class ModelLoadError(RuntimeError):
    """A model that cannot be served; the message says why."""


def providers_for(device: str) -> list[str]:
    """The explicit provider list for a device; ``cuda`` without CUDA is an error."""
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda":
        if not has_cuda:
            raise ModelLoadError(
                "CONVSERVE_DEVICE=cuda, but this onnxruntime build has no CUDA provider "
                f"(available: {', '.join(available)}); install onnxruntime-gpu or use cpu"
            )
        _preload_cuda()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto" and has_cuda:
        _preload_cuda()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


_cuda_preloaded = False


def _preload_cuda() -> None:
    """Load the CUDA and cuDNN libraries that ``onnxruntime-gpu[cuda,cudnn]`` installs as
    Python packages (the GPU image), once; an image with the libraries on the system path
    (a CUDA base image) loads them from there anyway."""
    global _cuda_preloaded
    if not _cuda_preloaded and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
        _cuda_preloaded = True


def open_session(path: Path, device: str, intra_op: int, inter_op: int) -> ort.InferenceSession:
    """The model's session on ``device`` (cpu, cuda, auto) with these operator threads (0:
    onnxruntime's choice)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op
    options.inter_op_num_threads = inter_op
    # Idle operator threads sleep instead of spinning: a spinning thread takes a core from
    # HTTP parsing and decoding (and from the other workers) between requests.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = providers_for(device)
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # onnxruntime raises its own untyped errors
        raise ModelLoadError(f"onnxruntime cannot load {path}: {err}") from err
    in_use = session.get_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in in_use:
        raise ModelLoadError(
            f"CONVSERVE_DEVICE=cuda, but no GPU answered: onnxruntime fell back to {in_use}"
        )
    return session


def warm_up_cpu() -> None:
    """Build what onnxruntime builds once per process at its first CPU session (1.7 MB that
    each worker process built for itself) with a session of the one-node model onnxruntime
    ships, then drop the session. Called before the worker processes are forked, it leaves
    that in pages they share; CPU only, one thread, so nothing runs in this process
    afterwards."""
    from onnxruntime.datasets import get_example

    open_session(Path(get_example("sigmoid.onnx")), "cpu", 1, 1)
