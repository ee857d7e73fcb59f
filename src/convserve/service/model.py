"""Loading an exported model: resolve its URI, create the onnxruntime session, warm it up and
check it. Everything the service needs comes from the model's own metadata
(``convserve.contract.ModelMetadata``)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from convserve import contract
from convserve.contract import MetadataError, ModelMetadata
from convserve.service.sessions import ModelLoadError, open_session, with_outputs

if TYPE_CHECKING:
    from convserve.service.registry import Registry
    from convserve.service.settings import Settings

log = logging.getLogger(__name__)

_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")
_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")


class TransientLoadError(ModelLoadError):
    """A version that could not be fetched this time (registry or artifact store unreachable,
    a file not there yet): worth trying again, unlike one that fails its checks."""


@dataclass(frozen=True)
class Source:
    """Where a model comes from: a file, or a registered version (with the alias followed)."""

    uri: str
    name: str
    version: str | None = None
    alias: str | None = None
    path: Path | None = None
    run_id: str | None = None
    # the registered version's tags (``metric.*``, ``convserve.dataset``, ...), once resolved
    tags: dict[str, str] = field(default_factory=dict, hash=False, compare=False)


@dataclass
class LoadedModel:
    source: Source
    session: ort.InferenceSession | None  # the whole graph; None while closed (``whole``)
    meta: ModelMetadata
    providers: list[str]
    loaded_at: float = field(default_factory=time.time)
    run_seconds: float = 0.0  # one warm session.run of two images, measured by self_check
    # the graph with the probabilities alone (``lean_session``), for runs that ask nothing else
    lean: ort.InferenceSession | None = None
    # the device and operator threads its sessions are opened with
    opening: tuple[str, int, int] = ("cpu", 0, 0)
    # the whole graph as read at the load, to open its session again from
    graph: bytes | None = field(default=None, repr=False)
    _opening_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def labels(self) -> list[str]:
        return self.meta.labels

    @property
    def channels(self) -> int:
        return self.meta.channels

    @property
    def height(self) -> int:
        return self.meta.height

    @property
    def width(self) -> int:
        return self.meta.width

    @property
    def blocks(self) -> list[str]:
        return self.meta.blocks

    @property
    def feature_shapes(self) -> dict[str, list[int]]:
        """block -> [C, H, W]."""
        return self.meta.feature_outputs

    @cached_property
    def output_names(self) -> list[str]:
        return self.meta.output_names()

    @cached_property
    def reference(self) -> dict[str, str]:
        """What an answer says about the model: name, version, alias and run where known."""
        s = self.source
        ref = {"name": s.name, "version": s.version, "alias": s.alias, "run_id": s.run_id}
        return {k: v for k, v in ref.items() if v is not None}

    def whole(self) -> ort.InferenceSession:
        """The whole graph's session. A model with a lean graph closes it once the load's
        checks are done (its memory: 45 MB a process for bench_serve.py's 224x224 model, whose
        activations it kept from the checks) and opens it again, from the graph read at the
        load, at the first run that asks for more than the probabilities; it stays open from
        then on."""
        session = self.session
        if session is None:
            with self._opening_lock:
                if self.session is None:
                    assert self.graph is not None
                    self.session = open_session(self.graph, *self.opening)
                session = self.session
        return session

    @property
    def probabilities_session(self) -> ort.InferenceSession:
        """The session that runs a request for the probabilities alone."""
        return self.lean if self.lean is not None else self.whole()

    def run(self, batch: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        """One ``session.run`` on ``[N, C, H, W]`` float32; outputs read by name. The
        probabilities alone run on the lean graph where there is one."""
        session = self.probabilities_session if outputs == _PROBABILITIES else self.whole()
        values = session.run(outputs, {contract.INPUT: batch})
        return dict(zip(outputs, values, strict=True))


_PROBABILITIES = [contract.PROBABILITIES]


def parse_uri(uri: str) -> Source:
    if m := _ALIAS.match(uri):
        return Source(uri, m["name"], alias=m["alias"])
    if m := _VERSION.match(uri):
        return Source(uri, m["name"], version=m["version"])
    path = Path(uri).expanduser()
    if uri.startswith("models:/") or path.suffix != ".onnx":
        raise ModelLoadError(
            f"model URI {uri!r} is neither a .onnx file nor models:/NAME@ALIAS or "
            "models:/NAME/VERSION"
        )
    return Source(uri, path.stem, version="file", path=path)


def resolve(source: Source, client: Registry) -> Source:
    """Pin an alias to its current version (one registry call)."""
    if source.alias is None:
        return source
    mv = client.get_model_version_by_alias(source.name, source.alias)
    return replace(source, version=str(mv.version), path=None, run_id=mv.run_id, tags=mv.tags)


def download(source: Source, client: Registry, cache_dir: Path) -> Source:
    """The local ``model.onnx`` of a registered version (downloaded once, kept in the cache).
    A failure to fetch it is a ``TransientLoadError``."""
    if source.path is not None:
        return source
    target = cache_dir / source.name / str(source.version)
    onnx_file = target / "model.onnx"
    uri = f"models:/{source.name}/{source.version}"
    run_id, tags = source.run_id, source.tags
    try:
        if run_id is None:  # a pinned version: its run and tags are read here
            mv = client.get_model_version(source.name, str(source.version))
            run_id, tags = mv.run_id, mv.tags
        if not onnx_file.exists():
            _fetch(source, client, target)
    except ModelLoadError:
        raise
    except Exception as err:  # network, artifact store, disk: any of them may recover
        raise TransientLoadError(f"cannot download {uri}: {type(err).__name__}: {err}") from err
    return replace(source, path=onnx_file, run_id=run_id, tags=tags)


def _fetch(source: Source, client: Registry, target: Path) -> None:
    """Download into a fresh partial folder of this process, then move the ``.onnx`` into
    place: a broken download never leaves a file in the cache, and worker processes fetching
    the same version at once do not meet in one folder."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    client.download_onnx(source.name, str(source.version), tmp)
    found = next(tmp.rglob("*.onnx"), None)
    if found is None:  # an artifact store that answers with nothing: may be back later
        raise TransientLoadError(
            f"models:/{source.name}/{source.version} has no .onnx file in the artifact store"
        )
    target.mkdir(parents=True, exist_ok=True)
    found.replace(target / "model.onnx")
    shutil.rmtree(tmp, ignore_errors=True)


def open_model(source: Source, settings: Settings) -> LoadedModel:
    """Create the session from the model's own metadata, warm it up and self-check it; then
    the lean graph's session for the probabilities alone, where the model has one."""
    assert source.path is not None
    if not source.path.is_file():
        raise TransientLoadError(f"no model file at {source.path}")
    threads = settings.intra_op_threads, settings.inter_op_threads
    session = open_session(source.path, settings.device, *threads)
    try:
        meta = ModelMetadata.from_props(dict(session.get_modelmeta().custom_metadata_map))
    except MetadataError as err:
        raise ModelLoadError(str(err)) from err
    if source.run_id is None and meta.run_id:
        source = replace(source, run_id=meta.run_id)
    model = LoadedModel(
        source=source,
        session=session,
        meta=meta,
        providers=session.get_providers(),
        opening=(settings.device, *threads),
    )
    self_check(model)
    lean = lean_session(model)
    if lean is not None:
        model.lean, model.graph = lean
        model.session = None  # opened again by the first run that asks for a feature map
    return model


def lean_session(model: LoadedModel) -> tuple[ort.InferenceSession, bytes] | None:
    """A session of the model's graph with the probabilities as its one output
    (``sessions.with_outputs``), opened as the whole graph's, for the requests that ask for
    nothing else, checked to answer as the whole graph does; and the whole graph as read, to
    open it again from. None where the graph has no other output, or
    where its lean graph cannot be made, does not load or answers otherwise (said in the log:
    the model is served by its whole graph alone, as before)."""
    if not model.blocks or model.source.path is None:
        return None
    try:
        whole = model.source.path.read_bytes()
        lean = open_session(with_outputs(whole, contract.PROBABILITIES), *model.opening)
        x = np.random.default_rng(0).random(
            (2, model.channels, model.height, model.width), np.float32
        )
        (got,) = lean.run(_PROBABILITIES, {contract.INPUT: x})
    except (ValueError, ModelLoadError) as err:
        log.info("%s: served by its whole graph (%s)", model.source.uri, err)
        return None
    (expected,) = model.whole().run(_PROBABILITIES, {contract.INPUT: x})
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-5, atol=1e-6):
        difference = np.abs(got - expected).max() if got.shape == expected.shape else got.shape
        log.info(
            "%s: served by its whole graph (its probabilities alone answered otherwise: %s)",
            model.source.uri,
            difference,
        )
        return None
    return lean, whole


def _check_input(model: LoadedModel) -> None:
    """The graph's input is the one the metadata describes: its name and the shape
    [batch, channels, height, width] (a named dimension matches any size)."""
    inputs = model.whole().get_inputs()
    announced = model.meta.input.name
    if [i.name for i in inputs] != [announced]:
        raise ModelLoadError(
            f"inputs are {[i.name for i in inputs]}, the metadata announces [{announced!r}]"
        )
    expected = [model.channels, model.height, model.width]
    got = list(inputs[0].shape[1:])
    if len(got) != 3 or any(
        isinstance(g, int) and g != e for g, e in zip(got, expected, strict=True)
    ):
        raise ModelLoadError(
            f"the input {announced!r} has shape {inputs[0].shape}, the metadata says "
            f"[batch, {', '.join(map(str, expected))}] (channels, height, width)"
        )


BATCH_SIZES = tuple(2**i for i in range(13))  # 1 to 4096
MEASURE_SECONDS = 0.5  # at most about this long measuring a model's batches at load


def batch_costs(model: LoadedModel, largest: int) -> dict[int, float]:
    """Seconds per image of a warm ``session.run`` of the probabilities at batch sizes 1, 2,
    4, ... up to ``largest``: the best of three runs at each. Stops before a size whose runs
    would take the measuring past ``MEASURE_SECONDS`` (a size takes about twice the last)."""
    rng = np.random.default_rng(0)
    costs: dict[int, float] = {}
    spent = 0.0
    for size in (s for s in BATCH_SIZES if s <= largest):
        x = rng.random((size, model.channels, model.height, model.width), np.float32)
        model.run(x, [contract.PROBABILITIES])  # this size's first run allocates
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            model.run(x, [contract.PROBABILITIES])
            elapsed = time.perf_counter() - start
            best, spent = min(best, elapsed), spent + elapsed
        costs[size] = best / size
        if spent + 2 * 4 * best > MEASURE_SECONDS:
            break
    # the memory arena grew to the largest batch measured: one run of one image that hands
    # the arena's free chunks back, so that a process serving small batches does not keep it
    arenas = "cpu:0;gpu:0" if "CUDAExecutionProvider" in model.providers else "cpu:0"
    shrink = ort.RunOptions()
    shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", arenas)
    one = np.zeros((1, model.channels, model.height, model.width), np.float32)
    model.probabilities_session.run(_PROBABILITIES, {contract.INPUT: one}, shrink)
    return costs


def self_check(model: LoadedModel) -> None:
    """Warm up and check on known inputs: input and outputs named, shaped and valid as the
    metadata says. Every failure is the version's own (``ModelLoadError``: refused for good),
    a run that onnxruntime refuses included."""
    names = [o.name for o in model.whole().get_outputs()]
    if names != model.output_names:
        raise ModelLoadError(f"outputs are {names}, the metadata announces {model.output_names}")
    _check_input(model)
    rng = np.random.default_rng(0)
    for batch in (
        np.zeros((1, model.channels, model.height, model.width), np.float32),
        rng.random((2, model.channels, model.height, model.width), np.float32),
    ):
        start = time.perf_counter()
        try:
            out = model.run(batch, model.output_names)
        except Exception as err:  # onnxruntime's InvalidArgument, RuntimeException, ...
            raise ModelLoadError(
                f"the model does not run on a {list(batch.shape)} input: {err}"
            ) from err
        model.run_seconds = time.perf_counter() - start
        probs = out[contract.PROBABILITIES]
        if probs.shape != (batch.shape[0], len(model.labels)):
            raise ModelLoadError(
                f"probabilities have shape {probs.shape}, expected "
                f"{(batch.shape[0], len(model.labels))}"
            )
        if not np.all(np.isfinite(probs)) or not np.allclose(probs.sum(1), 1.0, atol=1e-3):
            raise ModelLoadError(
                "the model's probabilities are not a distribution on a known input"
            )
        for block, shape in model.feature_shapes.items():
            got = list(out[contract.feature_output(block)].shape[1:])
            if got != shape:
                raise ModelLoadError(f"{block} has shape {got}, the metadata says {shape}")
