"""Every request validation rule: the bad value is refused with a message naming the field."""

from __future__ import annotations

import pytest

from ditserve.deployments import GenerationRequest, RequestError, resolve_request, select_model
from ditserve.models import get_spec

QWEN = get_spec("Qwen/Qwen-Image")  # true CFG, sizes multiple of 16 up to 2048
FLUX = get_spec("black-forest-labs/FLUX.1-dev")  # guidance-distilled


def _parse_error(**fields) -> RequestError:
    with pytest.raises(RequestError) as info:
        GenerationRequest.parse({"prompt": "a cat", **fields})
    return info.value


def _resolve_error(spec, **fields) -> RequestError:
    req = GenerationRequest.parse({"prompt": "a cat", **fields})
    with pytest.raises(RequestError) as info:
        resolve_request(req, spec)
    return info.value


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt(prompt):
    err = _parse_error(prompt=prompt)
    assert err.field == "prompt" and "must not be empty" in err.message


def test_missing_prompt():
    with pytest.raises(RequestError, match="^prompt: Field required"):
        GenerationRequest.parse({})


@pytest.mark.parametrize("steps", [0, 201, -3])
def test_steps_out_of_range(steps):
    err = _parse_error(num_inference_steps=steps)
    assert err.field == "num_inference_steps"
    assert "greater than or equal to 1" in err.message or "less than or equal to 200" in err.message


@pytest.mark.parametrize("n", [0, 11])
def test_n_out_of_range(n):
    err = _parse_error(n=n)
    assert err.field == "n" and ("1" in err.message or "10" in err.message)


@pytest.mark.parametrize("field", ["guidance_scale", "true_cfg_scale"])
def test_negative_scales(field):
    err = _parse_error(**{field: -1.0})
    assert err.field == field and "greater than or equal to 0" in err.message


@pytest.mark.parametrize("size", ["1024", "axb", "0x64", "64x-16", "64 by 64"])
def test_malformed_size(size):
    err = _parse_error(size=size)
    assert err.field == "size" and "WIDTHxHEIGHT" in err.message


def test_size_not_a_multiple_of_the_model_granularity():
    err = _resolve_error(QWEN, size="1000x1024")
    assert err.field == "size" and "width 1000 is not a multiple of 16" in err.message


def test_size_beyond_the_model_maximum():
    err = _resolve_error(QWEN, size="1024x4096")
    assert err.field == "size" and "height 4096 is outside 16..2048" in err.message


def test_unknown_model_is_404_naming_model():
    req = GenerationRequest.parse({"prompt": "a cat", "model": "acme/none"})
    with pytest.raises(RequestError) as info:
        select_model(req, {QWEN.id: QWEN}, QWEN.id)
    assert info.value.field == "model" and info.value.status == 404
    assert "unknown model 'acme/none'; served: Qwen/Qwen-Image" in info.value.message


def test_unknown_field_is_refused():
    err = _parse_error(stepz=3)
    assert err.field == "stepz" and err.message == "unknown field"


def test_seed_must_be_non_negative():
    assert _parse_error(seed=-1).field == "seed"


def test_guidance_scale_on_a_true_cfg_model_is_refused():
    err = _resolve_error(QWEN, guidance_scale=3.5)
    assert err.field == "guidance_scale" and "use true_cfg_scale" in err.message


def test_negative_prompt_without_true_cfg_is_refused():
    err = _resolve_error(FLUX, negative_prompt="blurry")
    assert err.field == "negative_prompt" and "true_cfg_scale > 1" in err.message


def test_true_cfg_without_negative_prompt_is_refused():
    err = _resolve_error(QWEN, true_cfg_scale=4.0)
    assert err.field == "true_cfg_scale" and "needs a negative_prompt" in err.message


def test_defaults_come_from_the_model():
    resolved = resolve_request(GenerationRequest(prompt="a cat", seed=7), QWEN)
    assert (resolved.params.width, resolved.params.height) == (1024, 1024)
    assert resolved.params.num_inference_steps == 50 and resolved.params.true_cfg_scale == 4.0
    assert resolved.negative_prompt is None and resolved.seed == 7
    flux = resolve_request(GenerationRequest(prompt="a cat", size="512x768"), FLUX)
    assert (flux.params.width, flux.params.height) == (512, 768) and flux.params.guidance_scale == 3.5
    assert 0 <= flux.seed < 2**31  # drawn when absent, and reported back


def test_default_negative_prompt_turns_true_cfg_on_unless_asked_off():
    spec = QWEN.model_copy(update={"default_negative_prompt": " "})
    plain = resolve_request(GenerationRequest(prompt="a cat"), spec)
    assert plain.negative_prompt == " " and plain.params.true_cfg_scale == QWEN.true_cfg_scale
    off = resolve_request(GenerationRequest(prompt="a cat", true_cfg_scale=1.0), spec)
    assert off.negative_prompt is None
    own = resolve_request(GenerationRequest(prompt="a cat", negative_prompt="blurry"), spec)
    assert own.negative_prompt == "blurry"
    assert resolve_request(GenerationRequest(prompt="a cat"), QWEN).negative_prompt is None


def test_lora_without_lora_dir_names_the_adapter_field():
    from ditserve.deployments import LoraConfig
    from ditserve.deployments.schema import validate_request

    for lora, field in (({"name": "x"}, "lora.name"), ([{"name": "a"}, {"name": "x"}], "lora.0.name")):
        with pytest.raises(RequestError, match="no LoRA adapters are served") as info:
            validate_request(GenerationRequest.parse({"prompt": "a cat", "lora": lora}), {QWEN.id: QWEN}, QWEN.id,
                             lora=LoraConfig())
        assert (info.value.field, info.value.status) == (field, 422)
