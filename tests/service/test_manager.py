"""The model manager: swapping versions without dropping requests, refusing broken ones."""

import asyncio
import logging
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


class _Watched:
    """A real registry whose alias lookups are counted, and refused while ``down`` is set."""

    def __init__(self, inner):
        self.inner, self.lookups, self.down = inner, 0, False

    def get_model_version_by_alias(self, *args):
        if self.down:
            raise ConnectionError("tracking server unreachable")
        self.lookups += 1
        return self.inner.get_model_version_by_alias(*args)

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


def test_a_version_the_registrys_listing_shows_served_is_not_looked_up_again(
    onnx_path, mlflow_url, tmp_path, monkeypatch
):
    """A poll's one search of every model's aliases stands for each model's own alias
    lookup while the alias shows the version served: a moved alias, a forced check, or
    ``RESOLVE_SECONDS`` later (for the version's tags), the alias is looked up again."""
    from convserve.service import manager as manager_module
    from convserve.service.registry import registry_for
    from tests.servers import registered_model

    client, name, (first, second) = registered_model(mlflow_url, onnx_path, "listed", 2)
    client.set_registered_model_alias(name, "champion", first)

    async def scenario():
        settings = Settings(model_uri=f"models:/{name}@champion", cache_dir=str(tmp_path))
        manager = ModelManager(settings, Metrics())
        registry = manager._client = _Watched(registry_for(mlflow_url))
        assert (await manager.check()).changed and registry.lookups == 1
        assert registry.aliases()[name] == {"champion": first}
        for _ in range(3):
            outcome = await manager.check(listed=registry.aliases()[name]["champion"])
            assert not outcome.changed and outcome.version == first
        assert registry.lookups == 1

        client.set_registered_model_alias(name, "champion", second)
        outcome = await manager.check(listed=registry.aliases()[name]["champion"])
        assert outcome.changed and manager.model.source.version == second
        assert registry.lookups == 2

        client.set_model_version_tag(name, second, "convserve.dataset", "shapes")
        await manager.check(listed=second)
        assert registry.lookups == 2 and "convserve.dataset" not in manager.model.source.tags
        monkeypatch.setattr(manager_module, "RESOLVE_SECONDS", 0.0)
        assert not (await manager.check(listed=second)).changed
        assert registry.lookups == 3 and manager.model.source.tags["convserve.dataset"] == "shapes"
        monkeypatch.undo()
        assert (await manager.check(force=True, listed=second)).changed
        assert registry.lookups == 4
        await manager.close()

    asyncio.run(scenario())


def test_a_registry_that_comes_back_clears_the_error_it_left(
    onnx_path, mlflow_url, tmp_path, caplog
):
    """The registry down for a poll leaves its error on the model (it keeps serving); the
    next poll that reaches it, by the alias or by the listing, clears it. The log says it
    once while it lasts, and once when the alias resolves again."""
    from convserve.service.registry import registry_for
    from tests.servers import registered_model

    client, name, (first,) = registered_model(mlflow_url, onnx_path, "blinks", 1)
    client.set_registered_model_alias(name, "champion", first)

    async def scenario():
        settings = Settings(model_uri=f"models:/{name}@champion", cache_dir=str(tmp_path))
        manager = ModelManager(settings, Metrics())
        registry = manager._client = _Watched(registry_for(mlflow_url))
        assert (await manager.check()).changed and manager.last_error is None
        registry.down = True
        with caplog.at_level(logging.INFO, logger="convserve.service.manager"):
            for _ in range(3):
                await manager.check(force=True)
            registry.down = False
            await manager.check(force=True)
        said = [r.getMessage() for r in caplog.records]
        assert [m for m in said if "unreachable" in m] == [
            f"cannot resolve models:/{name}@champion: tracking server unreachable; trying "
            "again every 10 s"
        ]
        assert f"models:/{name}@champion resolves to version {first} now" in said
        for listed in (None, first):  # looked up, then shown by the listing
            registry.down = True
            outcome = await manager.check(force=True)
            assert not outcome.changed and "unreachable" in manager.last_error
            assert manager.model.source.version == first  # still served
            registry.down = False
            assert not (await manager.check(listed=listed)).changed
            assert manager.last_error is None, listed
        await manager.close()

    asyncio.run(scenario())
