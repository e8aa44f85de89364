"""LoRA options of a deployment (``LoraConfig``) and the error a bad adapter raises (``LoraError``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LoraError(ValueError):
    """An adapter that cannot be served for a request: ``field`` names the request field (for the
    4xx), ``status`` is the HTTP status the edge answers with."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status

    def __reduce__(self):  # crosses process boundaries with all its fields
        return (type(self), (self.field, self.message, self.status))


class LoraConfig(BaseModel):
    """Where a deployment's LoRA adapters come from and how many it keeps loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lora_dir: str | None = Field(
        None, description="Folder of LoRA adapters: each subfolder or .safetensors file in it is an adapter named "
        "by its folder/file stem (none: requests with `lora` are refused). Must be readable by every DiT rank.",
    )
    max_loras_per_request: int = Field(
        4, ge=1, le=16, description="Most adapters one request may combine (default 4, or max_loras_per_replica "
        "when that is smaller).",
    )
    max_loras_per_replica: int = Field(
        8, ge=1, description="Adapters each DiT rank keeps on its device (least recently used evicted first).",
    )
    max_cpu_loras: int = Field(
        16, ge=0, description="Adapters evicted from the device that each rank keeps in CPU memory, so reloading "
        "them reads no file (0: evicted adapters are dropped).",
    )

    @model_validator(mode="after")
    def _fits(self) -> LoraConfig:
        if "max_loras_per_request" not in self.model_fields_set and self.max_loras_per_request > self.max_loras_per_replica:
            # the default follows a smaller replica capacity instead of refusing it
            object.__setattr__(self, "max_loras_per_request", self.max_loras_per_replica)
        if self.max_loras_per_request > self.max_loras_per_replica:
            raise ValueError(f"max_loras_per_request={self.max_loras_per_request} exceeds "
                             f"max_loras_per_replica={self.max_loras_per_replica}: one request's adapters must fit "
                             "on the device together")
        return self
