"""The engine: dynamic batching on a real onnxruntime session, draining, errors."""

import asyncio
import threading
import time

import numpy as np
import pytest

from convserve.service import engine as engine_module
from convserve.service.engine import Engine
from convserve.service.manager import ModelManager
from convserve.service.metrics import Metrics
from convserve.service.settings import Settings


def _unbatched(manager: ModelManager, one_core: bool = False) -> Engine:
    """An engine of the manager's model that runs each request alone."""
    return Engine(
        manager.model,
        manager.executor,
        manager.metrics,
        batching=False,
        max_batch_size=1,
        max_batch_wait_ms=0,
        one_core=one_core,
    )


def _run_count(metrics: Metrics) -> float:
    samples = metrics.batch_size.collect()[0].samples
    return next(s.value for s in samples if s.name.endswith("_count"))


@pytest.fixture
def threaded(monkeypatch):
    """Every session.run in the inference threads, as for a model slower than
    ``INLINE_SECONDS``: requests overlap there, and batches form."""
    monkeypatch.setattr(engine_module, "INLINE_SECONDS", 0.0)


def test_batched_results_equal_unbatched(onnx_path, threaded):
    async def scenario():
        settings = Settings(model_uri=str(onnx_path), max_batch_wait_ms=20, max_batch_size=16)
        manager = ModelManager(settings, Metrics())
        await manager.check()
        model = manager.model
        rng = np.random.default_rng(1)
        images = rng.random((40, 1, 8, 8), dtype=np.float32)
        outputs = model.output_names
        batched = await asyncio.gather(
            *(manager.engine.infer(images[i : i + 1], outputs) for i in range(40))
        )
        assert _run_count(manager.metrics) <= 5  # forty requests, a few session.run calls
        single = _unbatched(manager)
        for i in range(40):
            alone = await single.infer(images[i : i + 1], outputs)
            for name in outputs:
                assert np.abs(batched[i][name] - alone[name]).max() <= 1e-6
        await manager.close()

    asyncio.run(scenario())


def test_a_batch_never_exceeds_the_limit_and_a_lone_request_does_not_wait(onnx_path, threaded):
    async def scenario():
        settings = Settings(model_uri=str(onnx_path), max_batch_wait_ms=500, max_batch_size=4)
        manager = ModelManager(settings, Metrics())
        await manager.check()
        engine = manager.engine
        images = np.zeros((10, 1, 8, 8), np.float32)
        one = ["probabilities"]
        await asyncio.gather(*(engine.infer(images[i : i + 1], one) for i in range(10)))
        buckets = manager.metrics.batch_size.collect()[0].samples
        total = next(s.value for s in buckets if s.name.endswith("_sum"))
        assert total == 10 and _run_count(manager.metrics) >= 3  # 10 images, batches of <= 4
        loop = asyncio.get_running_loop()
        start = loop.time()
        await engine.infer(images[:1], ["probabilities"])
        assert loop.time() - start < 0.4  # not the 500 ms batching wait
        await manager.close()

    asyncio.run(scenario())


def test_close_drains_requests_in_flight(onnx_path, threaded):
    async def scenario():
        settings = Settings(model_uri=str(onnx_path), max_batch_wait_ms=5)
        manager = ModelManager(settings, Metrics())
        await manager.check()
        engine = manager.engine
        images = np.zeros((1, 1, 8, 8), np.float32)
        pending = [asyncio.create_task(engine.infer(images, ["probabilities"])) for _ in range(30)]
        await asyncio.sleep(0)
        await engine.close()
        results = await asyncio.gather(*pending)
        assert all(r["probabilities"].shape == (1, 10) for r in results)
        # a caller that arrives after close still gets an answer, unbatched
        assert (await engine.infer(images, ["probabilities"]))["probabilities"].shape == (1, 10)
        await manager.close()

    asyncio.run(scenario())


def test_a_failed_run_reaches_every_waiting_request(onnx_path, threaded):
    async def scenario():
        settings = Settings(model_uri=str(onnx_path), max_batch_wait_ms=20)
        manager = ModelManager(settings, Metrics())
        await manager.check()
        engine = manager.engine
        images = np.zeros((1, 1, 8, 8), np.float32)
        tasks = [engine.infer(images, ["no-such-output"]) for _ in range(5)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, Exception) for r in results)
        ok = await engine.infer(images, ["probabilities"])  # the engine still serves
        assert ok["probabilities"].shape == (1, 10)
        await manager.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("batching", [True, False])
def test_outputs_are_read_by_name(onnx_path, batching):
    async def scenario():
        settings = Settings(model_uri=str(onnx_path), batching=batching)
        manager = ModelManager(settings, Metrics())
        await manager.check()
        images = np.zeros((2, 1, 8, 8), np.float32)
        out = await manager.engine.infer(images, ["features.block2", "probabilities"])
        assert out["features.block2"].shape == (2, 8, 4, 4)
        assert out["probabilities"].shape == (2, 10)
        await manager.close()

    asyncio.run(scenario())


def test_requests_that_arrive_together_share_a_run_on_the_event_loop(onnx_path):
    """A model that runs on the event loop: its run holds the loop, so the requests that came
    in with one have not reached the engine when it starts. Each of them found the engine
    idle and ran alone, and batches never formed whatever the batch size. Eight requests
    started in one turn of the loop now share runs of the batch size, on the loop, each with
    its unbatched answer; a lone request still runs at once."""

    async def scenario():
        settings = Settings(model_uri=str(onnx_path), max_batch_size=4, max_batch_wait_ms=500)
        manager = ModelManager(settings, Metrics())
        await manager.check()
        engine = manager.engine
        engine.typical_run = 0.0  # as measured for the tiny model: it runs on the loop
        runs: list[tuple[int, int]] = []
        run = engine.model.run

        def recorded(batch, outputs):
            runs.append((batch.shape[0], threading.get_ident()))
            return run(batch, outputs)

        engine.model.run = recorded  # type: ignore[method-assign]
        images = np.random.default_rng(2).random((8, 1, 8, 8), dtype=np.float32)
        outputs = ["probabilities"]
        together = await asyncio.gather(
            *(engine.infer(images[i : i + 1], outputs) for i in range(8))
        )
        assert runs == [(4, threading.get_ident())] * 2, runs
        single = _unbatched(manager)
        for i in range(8):
            alone = await single.infer(images[i : i + 1], outputs)
            assert np.abs(together[i]["probabilities"] - alone["probabilities"]).max() <= 1e-6
        runs.clear()
        loop = asyncio.get_running_loop()
        start = loop.time()
        await engine.infer(images[:1], outputs)
        assert runs == [(1, threading.get_ident())]
        assert loop.time() - start < 0.4  # not the 500 ms batching wait
        await manager.close()

    asyncio.run(scenario())


def test_a_fast_model_runs_on_the_event_loop_and_a_slow_one_in_the_threads(onnx_path):
    """The tiny test model's run takes well under INLINE_SECONDS: no thread hop. Once its
    measured run time says otherwise, runs move to the inference threads."""

    async def scenario():
        settings = Settings(model_uri=str(onnx_path))
        manager = ModelManager(settings, Metrics())
        await manager.check()
        engine = manager.engine
        assert 0 < engine.model.run_seconds < engine_module.INLINE_SECONDS
        threads = []
        run = engine.model.run

        def recording_run(batch, outputs):
            threads.append(threading.get_ident())
            return run(batch, outputs)

        engine.model.run = recording_run  # type: ignore[method-assign]
        images = np.zeros((1, 1, 8, 8), np.float32)
        await engine.infer(images, ["probabilities"])
        assert threads == [threading.get_ident()]
        engine.typical_run = 10 * engine_module.INLINE_SECONDS  # as if a large model
        await engine.infer(images, ["probabilities"])
        assert threads[1] != threading.get_ident()
        await manager.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("cores", "workers", "threads", "cuda", "expected"),
    [
        (2, 0, 0, False, (2, 1)),  # one process per core, one operator thread each
        (16, 0, 0, False, (8, 2)),  # at most 8 processes; the cores shared among them
        (16, 4, 0, False, (4, 4)),
        (1, 0, 0, False, (1, 1)),
        (8, 0, 0, True, (1, 8)),  # a GPU: one process
        (4, 3, 2, False, (3, 2)),  # as set
    ],
)
def test_workers_and_threads_follow_the_cores(monkeypatch, cores, workers, threads, cuda, expected):
    from convserve.service import settings as settings_module

    monkeypatch.setattr(settings_module, "available_cores", lambda: cores)
    s = Settings(workers=workers, intra_op_threads=threads).resolved(cuda)
    assert (s.workers, s.intra_op_threads) == expected


def test_available_cores_is_the_affinity():
    import os

    from convserve.service.settings import available_cores

    assert 1 <= available_cores() <= len(os.sched_getaffinity(0))


def _opened(path, **settings):
    from convserve.service.model import Source, open_model

    return open_model(Source(str(path), "model", "file", path=path), Settings(**settings))


def test_the_batch_plan_follows_the_measured_cost(onnx_path, monkeypatch):
    """Unset, the batch size is the smallest whose cost per image is near the cheapest
    measured, at least two, and the wait at most a full batch's run (none where batches
    measured no cheaper); set, the settings win."""
    model = _opened(onnx_path)
    plan = engine_module.plan_batches(model, Settings())
    assert list(plan.costs) == [1, 2, 4, 8, 16, 32]  # a small model: every size measured
    cheapest = min(plan.costs.values())
    assert plan.costs[plan.size] <= cheapest * engine_module.NEAR_BEST
    assert all(
        cost > cheapest * engine_module.NEAR_BEST for b, cost in plan.costs.items() if b < plan.size
    )
    assert 0 < plan.wait_ms <= min(2.0, plan.costs[plan.size] * plan.size * 1e3 + 1e-9)
    assert "batches of up to" in plan.describe() and "measured ms per image" in plan.describe()

    # a model whose cost per image does not fall with the batch: batches of two of the
    # requests already waiting (each run's fixed cost, shared), no wait
    flat = {1: 1e-3, 2: 1.02e-3, 4: 0.99e-3, 8: 1.01e-3}
    monkeypatch.setattr(engine_module, "batch_costs", lambda model, largest: flat)
    assert engine_module.plan_batches(model, Settings()) == engine_module.BatchPlan(2, 0.0, flat)
    said = engine_module.plan_batches(model, Settings()).describe()
    assert said.startswith("batches of up to 2 images of the requests already waiting (")
    # one so large that only one image was measured: batches of one
    alone = {1: 0.2}
    monkeypatch.setattr(engine_module, "batch_costs", lambda model, largest: alone)
    assert engine_module.plan_batches(model, Settings()) == engine_module.BatchPlan(1, 0.0, alone)
    # one that halves up to 8: batches of 8, waiting at most the 2 ms cap
    falling = {1: 8e-3, 2: 4e-3, 4: 2e-3, 8: 1e-3, 16: 0.99e-3}
    monkeypatch.setattr(engine_module, "batch_costs", lambda model, largest: falling)
    assert engine_module.plan_batches(model, Settings()).size == 8
    assert engine_module.plan_batches(model, Settings()).wait_ms == 2.0
    set_both = Settings(max_batch_size=4, max_batch_wait_ms=7)
    assert engine_module.plan_batches(model, set_both) == engine_module.BatchPlan(4, 7.0, {})
    assert engine_module.plan_batches(model, Settings(batching=False)).size == 1


def _plan_in_a_process(path: str, peers: str) -> tuple[int, dict[int, float], int | None]:
    import os
    from pathlib import Path

    plan = engine_module.plan_batches(_opened(Path(path)), Settings(peers_dir=peers))
    return os.getpid(), plan.costs, plan.measured_by


def test_the_worker_processes_of_one_server_measure_a_model_once(onnx_path, tmp_path):
    """Three processes loading one model file at once (a server's workers): one measures its
    batches, alone, and the others take its figures and say whose they are; the file changed
    (a new version at the same path) is measured again."""
    import multiprocessing
    import os
    import shutil

    path = tmp_path / "model.onnx"
    shutil.copy(onnx_path, path)
    peers = tmp_path / "peers"
    peers.mkdir()
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        plans = pool.starmap(_plan_in_a_process, [(str(path), str(peers))] * 3)
    measured = [(pid, costs) for pid, costs, by in plans if by is None]
    assert len(measured) == 1, plans
    (measurer, costs), pids = measured[0], {pid for pid, _, _ in plans}
    assert len(pids) == 3
    assert all(c == costs and by in (None, measurer) for _, c, by in plans)
    assert list(costs) == [1, 2, 4, 8, 16, 32]
    assert not list(peers.glob("*.json"))  # the folder's .json files are admin requests
    again = engine_module.plan_batches(_opened(path), Settings(peers_dir=str(peers)))
    assert again.measured_by == measurer and f"(by worker process {measurer}):" in again.describe()
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    fresh = engine_module.plan_batches(_opened(path), Settings(peers_dir=str(peers)))
    assert fresh.measured_by is None and list(fresh.costs) == list(costs)


def test_measuring_batches_stops_within_its_budget(onnx_path, monkeypatch):
    from convserve.service import model as model_module

    model = _opened(onnx_path)
    monkeypatch.setattr(model_module, "MEASURE_SECONDS", 0.0)
    assert list(model_module.batch_costs(model, 32)) == [1]  # over budget after the first
    monkeypatch.setattr(model_module, "MEASURE_SECONDS", 10.0)
    assert list(model_module.batch_costs(model, 8)) == [1, 2, 4, 8]  # never past the largest


def test_a_model_on_one_core_runs_on_the_loop_up_to_its_limit(onnx_path):
    """One CPU thread: runs that take up to ONE_CORE_INLINE_SECONDS stay on the event loop
    (the thread would share the loop's core), a batch of two of a model of under 4 ms an image
    among them; longer ones, and any run of a model with more threads than that, go to the
    inference threads."""

    async def scenario():
        manager = ModelManager(Settings(model_uri=str(onnx_path)), Metrics())
        await manager.check()
        model = manager.model
        ran_on: list[int] = []
        run = model.run

        def recorded(*args):
            ran_on.append(threading.get_ident())
            return run(*args)

        model.run = recorded
        x = np.zeros((1, 1, 8, 8), np.float32)
        loop_thread = threading.get_ident()
        limit = engine_module.ONE_CORE_INLINE_SECONDS
        pair = engine_module.WAITING_BATCH * 0.0036  # a batch of two of a 3.6 ms-an-image model
        cases = [(True, limit / 2, True), (True, limit * 4, False), (False, limit / 2, False)]
        cases.append((True, pair, True))
        for one_core, typical, on_loop in cases:
            engine = _unbatched(manager, one_core=one_core)
            engine.typical_run = typical  # as if measured
            await engine.infer(x, ["probabilities"])
            assert (ran_on[-1] == loop_thread) is on_loop, (one_core, typical)
        await manager.close()

    asyncio.run(scenario())


def test_a_run_sent_to_the_threads_by_a_slow_spell_comes_back_to_the_loop(onnx_path):
    """A model that belongs on the loop, its moving average pushed over the limit by a slow
    spell (preempted runs), runs in the threads while the loop is busy with other requests:
    its runs are timed where they run, not by the loop's wait for their results, and it is
    back on the loop within a few dozen runs. Timed by the loop, every run read at least the
    loop's busy spells (longer than the limit here), and it stayed in the threads for good."""

    async def scenario():
        manager = ModelManager(Settings(model_uri=str(onnx_path)), Metrics())
        await manager.check()
        engine = _unbatched(manager, one_core=True)
        engine.typical_run = engine_module.ONE_CORE_INLINE_SECONDS * 4  # the slow spell
        x = np.zeros((1, 1, 8, 8), np.float32)
        busy = True

        async def other_requests() -> None:  # the loop away past the limit at a time
            while busy:
                time.sleep(engine_module.ONE_CORE_INLINE_SECONDS * 1.25)
                await asyncio.sleep(0)

        others = asyncio.create_task(other_requests())
        for _ in range(60):
            await engine.infer(x, ["probabilities"])
        busy = False
        await others
        assert engine.typical_run < engine.inline_up_to, engine.typical_run
        await manager.close()

    asyncio.run(scenario())
