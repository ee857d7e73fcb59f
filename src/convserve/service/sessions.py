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


def open_session(
    path: Path | bytes, device: str, intra_op: int, inter_op: int
) -> ort.InferenceSession:
    """The model's session (a file, or a serialised model) on ``device`` (cpu, cuda, auto)
    with these operator threads (0: onnxruntime's choice)."""
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
        model = path if isinstance(path, bytes) else str(path)
        session = ort.InferenceSession(model, options, providers=providers)
    except Exception as err:  # onnxruntime raises its own untyped errors
        what = "the model" if isinstance(path, bytes) else path
        raise ModelLoadError(f"onnxruntime cannot load {what}: {err}") from err
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


# Protocol buffers' wire format, as far as ``with_outputs`` reads it: ModelProto's graph is
# field 7, GraphProto's outputs field 12, ValueInfoProto's name field 1.
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_MODEL_GRAPH, _GRAPH_OUTPUT, _VALUE_INFO_NAME = 7, 12, 1


def with_outputs(model: bytes, keep: str) -> bytes:
    """The serialised ONNX ``model`` with one graph output, ``keep``; every node, initializer
    and metadata entry stays. onnxruntime hands each graph output over in its plain layout,
    where its CPU convolutions run in a blocked one: an export's feature maps, as outputs,
    cost every run that layout's gains (with the layout optimisations off, the graph with and
    without them ran alike). Without them, convserve's 60 M multiply-add model's
    probabilities ran 10% faster, the 28x28 model's 8%. Read and written field by field: the
    service needs no ``onnx`` package, nor protobuf's runtime, which it imports only for gRPC
    (2.7 MB a process). A model it cannot read raises ``ValueError``."""
    view = memoryview(model)  # slices of it copy nothing
    out = bytearray()
    for number, start, payload, end in _fields(view):
        if number != _MODEL_GRAPH:
            out += view[start:end]
            continue
        graph, content, kept = bytearray(), view[payload:end], 0
        for inner, inner_start, inner_payload, inner_end in _fields(content):
            if inner == _GRAPH_OUTPUT:
                if _name(content[inner_payload:inner_end]) != keep:
                    continue
                kept += 1
            graph += content[inner_start:inner_end]
        if kept != 1:
            raise ValueError(f"the graph has {kept} outputs named {keep!r}, not one")
        out += _varint(number << 3 | _LENGTH) + _varint(len(graph)) + graph
    return bytes(out)


def _name(value_info: memoryview) -> str | None:
    for number, _, payload, end in _fields(value_info):
        if number == _VALUE_INFO_NAME:
            return bytes(value_info[payload:end]).decode()
    return None


def _fields(message: memoryview) -> list[tuple[int, int, int, int]]:
    """Each field of a message: its number, where it starts, where its value starts (a
    length-delimited one's content) and where it ends."""
    fields, at = [], 0
    while at < len(message):
        start = at
        key, at = _read_varint(message, at)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, at = _read_varint(message, at)
            payload = at
        elif wire == _LENGTH:
            size, payload = _read_varint(message, at)
            at = payload + size
        elif wire in (_FIXED64, _FIXED32):
            payload = at
            at += 8 if wire == _FIXED64 else 4
        else:
            raise ValueError(f"field {number} has wire type {wire}, which ONNX does not use")
        if at > len(message):
            raise ValueError("the model ends inside a field")
        fields.append((number, start, payload, at))
    return fields


def _read_varint(data: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("the model ends inside a number")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            return value, at


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
