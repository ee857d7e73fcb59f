"""The model manager: swapping versions without dropping requests, refusing broken ones."""

import asyncio
import shutil

import numpy as np

from convserve.service.manager import ModelManager
from convserve.service.metrics import Metrics
from convserve.service.settings import Settings


def test_a_swap_lets_requests_in_flight_finish_on_the_old_model(onnx_path, rgb_onnx_path, tmp_path):
    path = tmp_path / "model.onnx"
    shutil.copy(onnx_path, path)

    async def scenario():
        manager = ModelManager(Settings(model_uri=str(path), max_batch_wait_ms=5), Metrics())
        assert (await manager.check()).changed
        old = manager.engine
        grey = np.zeros((1, 1, 8, 8), np.float32)
        in_flight = [asyncio.create_task(old.infer(grey, ["probabilities"])) for _ in range(20)]
        await asyncio.sleep(0)
        shutil.copy(rgb_onnx_path, path)  # a new version at the same place
        outcome = await manager.check(force=True)
        assert outcome.changed and manager.engine is not old
        assert manager.model.channels == 3 and len(manager.model.labels) == 9
        results = await asyncio.gather(*in_flight)
        assert all(r["probabilities"].shape == (1, 10) for r in results)  # the old model's
        await manager.close()

    asyncio.run(scenario())


def test_a_broken_version_is_refused_and_the_old_one_keeps_serving(onnx_path, tmp_path):
    path = tmp_path / "model.onnx"
    shutil.copy(onnx_path, path)

    async def scenario():
        metrics = Metrics()
        manager = ModelManager(Settings(model_uri=str(path)), metrics)
        await manager.check()
        serving = manager.engine
        path.write_bytes(b"not an onnx file")
        outcome = await manager.check(force=True)
        assert not outcome.changed and "refused" in outcome.message
        assert manager.engine is serving and "file" in manager.refused
        assert metrics.refused._value.get() == 1
        out = await manager.engine.infer(np.zeros((1, 1, 8, 8), np.float32), ["probabilities"])
        assert out["probabilities"].shape == (1, 10)
        # a forced reload retries it once repaired
        shutil.copy(onnx_path, path)
        assert (await manager.check(force=True)).changed and manager.refused == {}
        await manager.close()

    asyncio.run(scenario())


def test_without_a_model_the_manager_says_why(tmp_path):
    async def scenario():
        manager = ModelManager(Settings(model_uri=str(tmp_path / "missing.onnx")), Metrics())
        outcome = await manager.check()
        assert manager.engine is None and "no model file" in outcome.message
        await manager.close()

    asyncio.run(scenario())


def test_a_version_whose_input_disagrees_with_its_metadata_is_refused_for_good(onnx_path, tmp_path):
    """The graph takes 8x8 images, its metadata says 6x6: refused at once, listed with the
    reason, and not tried again (it was retried with backoff for ever)."""
    import onnx

    model = onnx.load(str(onnx_path))
    for prop in model.metadata_props:
        if prop.key in ("convserve.height", "convserve.width"):
            prop.value = "6"
    path = tmp_path / "wrong-size.onnx"
    onnx.save(model, str(path))

    async def scenario():
        metrics = Metrics()
        manager = ModelManager(Settings(model_uri=str(path)), metrics)
        outcome = await manager.check()
        assert manager.model is None and "refused" in outcome.message
        assert "has shape" in manager.refused["file"] and "6, 6" in manager.refused["file"]
        assert manager.retrying == {} and metrics.refused._value.get() == 1
        again = await manager.check()
        assert "was refused" in again.message and metrics.refused._value.get() == 1
        assert manager.problems()["file"].startswith("refused: ")
        await manager.close()

    asyncio.run(scenario())
