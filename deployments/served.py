"""The served-model summary: everything the Router needs to know about its model, read once.

``build_app`` reads the checkpoint once (``describe_served_model``) and binds the resulting
``ServedModel`` to the Router, so the Router never resolves a model id or opens a model file: it
validates requests and lists models from this summary alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from ditserve.features.cache import CacheSettings
from ditserve.features.lora import LoraConfig
from ditserve.models import STAGES, ModelSpec, adapter_class, resolve_model
from ditserve.parallel.vae import VaeConfig

from .attach import check_support, model_support
from .engine import EngineConfig
from .images_in import ImageInputConfig
from .schema import GenerationRequest, ResolvedRequest, validate_request


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """One served model, as requests are checked against it.

    Attributes:
        spec: the registry entry after the checkpoint's overrides (``ditserve.json``).
        num_blocks: transformer blocks, for the cache checks (``None``: a class the caches do not know).
        vae: the deployment's VAE options (a size must split over its patch-parallel workers).
        cache_default: the deployment's cache (``cache_backend``/``cache_config``), merged with a request's.
        lora: the deployment's LoRA options (its ``lora_dir`` names the adapters a request may ask for).
        prior: whether the model conditions on an autoregressive prior (a Prior deployment is bound).
        images: the deployment's limits on input images (editing).
    """

    spec: ModelSpec
    num_blocks: int | None
    vae: VaeConfig
    cache_default: CacheSettings | None = None
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    prior: bool = False
    images: ImageInputConfig = dataclasses.field(default_factory=ImageInputConfig)  # input image limits

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def specs(self) -> Mapping[str, ModelSpec]:
        """The served models by id (one today; ``/v1/models`` lists them)."""
        return {self.spec.id: self.spec}

    def validate(self, req: GenerationRequest, image_field: str | None = None) -> ResolvedRequest:
        """Check ``req`` against this model and fill its defaults (raises ``RequestError``);
        ``image_field``: what the errors call its input image (``validate_request``)."""
        return validate_request(req, self.specs, self.spec.id, cache_default=self.cache_default,
                                num_blocks=self.num_blocks, vae=self.vae, lora=self.lora, images=self.images,
                                image_field=image_field)


def describe_served_model(config: EngineConfig) -> ServedModel:
    """Resolve ``config.model``, refuse what it cannot run (``check_support``: every start-up
    refusal) and read what validation needs from its checkpoint (builder side)."""
    resolved = resolve_model(config.model)
    cls = adapter_class(resolved.spec.family)
    caps = check_support(config, cls.stages_with_prior(STAGES), caps=model_support(resolved))
    return ServedModel(resolved.spec, caps.num_blocks, config.vae, config.cache(), config.lora, cls.has_prior(),
                       config.images)
