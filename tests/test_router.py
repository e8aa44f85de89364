"""The Router without a cluster (fake stage handles): a request with adapters goes to the DiT with its
first adapter as Serve's multiplexed model id, one without goes plain; ``/v1/models`` reads
``lora_dir`` at each call."""

from __future__ import annotations

import asyncio

import pytest

from ditserve.deployments import AppConfig, GenerationRequest, LoraConfig, VaeConfig
from ditserve.deployments.router import Router
from ditserve.deployments.served import ServedModel
from ditserve.models import get_spec

QWEN = get_spec("Qwen/Qwen-Image")


class _Method:
    def __init__(self, stage: _Stage, name: str) -> None:
        self.stage, self.name = stage, name

    def remote(self, *args) -> _Reply:
        self.stage.calls.append((self.name, self.stage.model_id))
        return _Reply()


class _Reply:
    """A DeploymentResponse: awaitable, and passed on unawaited to the next stage."""

    def __await__(self):
        return "decoded"
        yield  # a generator: awaiting it returns at once


class _Stage:
    """A DeploymentHandle's surface: ``options(multiplexed_model_id=...)`` and ``.<method>.remote``."""

    def __init__(self, calls: list, model_id: str | None = None) -> None:
        self.calls, self.model_id = calls, model_id

    def options(self, *, multiplexed_model_id: str) -> _Stage:
        return _Stage(self.calls, multiplexed_model_id)

    def __getattr__(self, name: str) -> _Method:
        return _Method(self, name)


@pytest.fixture
def router(tmp_path):
    for name in ("x", "y"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"")  # listed by name; the Router never reads them
    served = ServedModel(QWEN, None, VaeConfig(), lora=LoraConfig(lora_dir=str(tmp_path)))
    calls: list = []
    # Serve's ingress wraps the class (its __init__ builds the ASGI app); ours is the base it wraps
    cls = next(c for c in Router.func_or_class.__mro__ if "_compose" in vars(c))
    instance = object.__new__(cls)
    cls.__init__(instance, AppConfig(), served, _Stage(calls), _Stage(calls), _Stage(calls))
    return instance, calls, tmp_path


@pytest.mark.parametrize(("lora", "model", "routed"), [
    (None, None, None),
    ({"name": "y"}, None, "y"),
    ([{"name": "y", "scale": 0.5}, {"name": "x"}], None, "y"),
    ({"name": "y"}, "x", "x"),  # the adapter named as model comes first
])
def test_dit_is_called_with_the_first_adapter_as_multiplexed_model_id(router, lora, model, routed):
    instance, calls, _ = router
    fields = {"prompt": "a cat", "size": "64x64", **({"lora": lora} if lora else {}), **({"model": model} if model else {})}
    resolved = instance.served.validate(GenerationRequest(**fields))
    assert asyncio.run(instance._compose(resolved)) == "decoded"
    assert calls == [("encode", None), ("denoise", routed), ("decode", None)]


def test_models_lists_adapters_of_lora_dir_at_each_call(router):
    instance, _, lora_dir = router
    cards = instance.models().data
    assert [(c.id, c.parent, c.root) for c in cards] == [(QWEN.id, None, QWEN.id), ("x", QWEN.id, QWEN.id),
                                                         ("y", QWEN.id, QWEN.id)]
    (lora_dir / "z").mkdir()
    assert [c.id for c in instance.models().data] == [QWEN.id, "x", "y", "z"]
