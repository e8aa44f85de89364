"""``POST /v1/images/edits`` on the served graph (tiny Qwen-Image-Edit; Router -> TextEncoder and
VAE.encode in parallel -> DiT -> VAE.decode): the ``openai`` client's ``images.edit``, a raw
multipart request and a JSON body with a base64 image each equal the in-process reference runner;
the conditioning cache makes a repeated image skip both encodes (counted in the response) with the
same image; bad uploads are 4xx naming the field, no replica restarts and the next good request is
answered. One served app for the module (each deploy costs seconds).

Also, in process: the input-safety module (``deployments/images_in.py``) and the cache's LRU bound.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import urllib.error
import urllib.request
import uuid
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from ray import serve

from ditserve.deployments import Engine, EngineConfig, GenerationRequest, RequestError
from ditserve.deployments.app import build_app
from ditserve.deployments.conditioning import ConditioningCache
from ditserve.deployments.config import AppConfig
from ditserve.deployments.images_in import ImageInputConfig, read_images
from ditserve.models.registry import get_spec
from ditserve.models.tiny import make_tiny

pytestmark = pytest.mark.timeout(600)

APP = "edits-test"
PROMPT, SEED, STEPS = "make the circle red", 7, 2
# small caps, so that the bad uploads below are cheap to make
CAPS = {"max_image_pixels": 1_000_000, "max_image_bytes": 100_000, "max_images_bytes": 150_000}


def png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def input_image(seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (48, 80, 3), dtype=np.uint8)


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A valid tiny PNG whose header declares ``width`` x ``height`` (a decompression bomb's header)."""
    data = bytearray(png(np.zeros((1, 1, 3), dtype=np.uint8)))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny("qwen-image-edit", tmp_path_factory.mktemp("edits") / "tiny")


@pytest.fixture(scope="module")
def reference(checkpoint):
    return Engine(EngineConfig(model=str(checkpoint), device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def served(ray_cluster, checkpoint):
    cfg = AppConfig.model_validate({
        "engine": {"model": str(checkpoint), "device": "cpu", "dtype": "float32", "images": CAPS},
        "accelerator": "gpu", "distributed_timeout_s": 60,
        "text_encoder": {"num_cpus": 0.1, "num_gpus": 0},
    })
    serve.run(build_app(cfg), name=APP, route_prefix="/")
    yield ray_cluster["url"]
    serve.delete(APP)


def reference_pixels(reference: Engine, **fields) -> np.ndarray:
    # the served ranks compute with one thread; so does the reference (same conv summation order)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = reference.generate(GenerationRequest(**fields))
    finally:
        torch.set_num_threads(threads)
    return np.stack([np.asarray(im) for im in result.images])


def reply_pixels(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return np.asarray(image.convert("RGB"))


def post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/v1/images/edits", data=body, headers={"content-type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def multipart(fields: dict, files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for i, (name, data) in enumerate(files):
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="in{i}.png"\r\n'
                "Content-Type: image/png\r\n\r\n")
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def replicas() -> dict:
    """Replica ids and rank pids of the DiT and VAE (a restarted replica or rank changes them)."""
    return {name: serve.get_deployment_handle(name, APP).info.remote().result() for name in ("DiT", "VAE")}


def test_openai_client_multipart_json_and_the_conditioning_cache(served, reference):
    import openai

    image = input_image()
    expected = reference_pixels(reference, prompt=PROMPT, images=[image], num_inference_steps=STEPS, seed=SEED)

    client = openai.OpenAI(base_url=served + "/v1", api_key="unused", max_retries=0)
    first = client.images.edit(image=("in.png", png(image), "image/png"), prompt=PROMPT,
                               extra_body={"num_inference_steps": STEPS, "seed": SEED})
    got = reply_pixels(first.data[0].b64_json)
    assert got.shape == expected.shape[1:] == (64, 96, 3)  # the size follows the input image
    assert np.abs(got.astype(int) - expected[0].astype(int)).max() <= 1
    extra = first.model_extra or {}
    assert extra["conditioning"] == {"vision_misses": 1, "latent_hits": 0, "latent_misses": 1}

    # the same image again, raw multipart with image[]: both encodes skipped, the same image
    body, ctype = multipart({"prompt": PROMPT, "num_inference_steps": STEPS, "seed": SEED}, [("image[]", png(image))])
    status, again = post(served, body, ctype)
    assert status == 200, again
    assert again["conditioning"] == {"vision_hits": 1, "latent_hits": 1, "latent_misses": 0}
    assert np.array_equal(reply_pixels(again["data"][0]["b64_json"]), got)
    assert again["timings"]["image_encode"] >= 0

    # JSON with a base64 image, true CFG, an explicit size and n=2; the extension fields as in a form
    fields = dict(prompt="make it blue", negative_prompt="blurry", true_cfg_scale=4.0, size="64x32", n=2,
                  num_inference_steps=STEPS, seed=3)
    expected = reference_pixels(reference, images=[image], **fields)
    status, reply = post(served, json.dumps({"image": base64.b64encode(png(image)).decode(), **fields}).encode(),
                         "application/json")
    assert status == 200, reply
    got = np.stack([reply_pixels(d["b64_json"]) for d in reply["data"]])
    assert got.shape == expected.shape == (2, 32, 64, 3)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    assert reply["conditioning"]["latent_hits"] == 1  # another prompt, the same image


BAD = [
    ("not-an-image", [("image", b"hello, not an image")], 415, "image[0]", "not a PNG, JPEG or WebP"),
    ("truncated-png", [("image", png(input_image())[:400])], 422, "image[0]", "truncated or corrupt"),
    ("one-pixel-wide", [("image", png(np.zeros((64, 1, 3), dtype=np.uint8)))], 422, "image[0]", "1x64"),
    ("decompression-bomb", [("image", bomb_png())], 413, "image[0]", "40000x40000 exceeds the 1 megapixel limit"),
    ("too-many-images", [("image[]", png(input_image()))] * 2, 422, "image", "2 images exceed the limit of 1"),
    ("too-many-bytes", [("image", png(np.random.RandomState(1).randint(0, 256, (200, 200, 3), dtype=np.uint8)))],
     413, "image[0]", "exceed the per-image limit of 100000"),
    ("gif", [("image", png(input_image(), "GIF"))], 415, "image[0]", "GIF is not accepted"),
    ("no-image", [], 422, "image", "required"),
]


def test_bad_uploads_are_4xx_naming_the_field_and_the_app_keeps_serving(served):
    before = replicas()
    for name, files, status, param, message in BAD:
        body, ctype = multipart({"prompt": PROMPT, "num_inference_steps": STEPS}, files)
        code, reply = post(served, body, ctype)
        assert code == status, (name, reply)
        assert reply["error"]["param"] == param, (name, reply)
        assert message in reply["error"]["message"], (name, reply)
        assert reply["error"]["message"].startswith(param + ":"), (name, reply)
    code, reply = post(served, *multipart({"prompt": PROMPT, "num_inference_steps": 1, "size": "32x32"},
                                          [("image", png(input_image()))]))
    assert code == 200, reply
    after = replicas()
    for name in ("DiT", "VAE"):
        assert after[name]["replica_id"] == before[name]["replica_id"], name
        assert after[name]["worker_pids"] == before[name]["worker_pids"], name


def test_images_in_checks_and_normalizes():
    spec = get_spec("Qwen/Qwen-Image-Edit")
    rgba = np.zeros((32, 48, 4), dtype=np.uint8)
    rgba[..., 3] = 128
    arrays, keys = read_images([png(rgba)], spec)
    assert arrays[0].shape == (32, 48, 4)  # alpha kept; the adapter converts as its pipeline reads
    # EXIF orientation applied: a 32x48 JPEG tagged "rotate 90" is read as 48x32
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 48, 3), dtype=np.uint8)).save(buf, format="JPEG", exif=exif)
    assert read_images([buf.getvalue()], spec)[0][0].shape == (48, 32, 3)
    # the same pixels in another container have the same key; other pixels another
    image = input_image()
    assert read_images([image], spec)[1] == read_images([png(image)], spec)[1] != read_images([input_image(1)], spec)[1]
    with pytest.raises(RequestError, match="takes no input images"):
        read_images([image], get_spec("Qwen/Qwen-Image"))
    with pytest.raises(RequestError, match=r"image\[0\]: 80x48 exceeds the 0.001 megapixel limit"):
        read_images([image], spec, ImageInputConfig(max_image_pixels=1000))
    with pytest.raises(RequestError, match="per-request limit"):
        read_images([png(image)], spec, ImageInputConfig(max_images_bytes=100))


def test_conditioning_cache_is_lru_bounded():
    cache = ConditioningCache(max_mb=2 * 4096 / 2**20)  # room for two 4 KiB entries
    for key in "abc":
        cache.put(key, torch.zeros(1024))
    assert cache.get("a") is None and cache.get("b") is not None and cache.get("c") is not None
    assert cache.bytes == 8192 and cache.stats()["hits"] == 2 and cache.stats()["misses"] == 1


def test_layered_output_is_one_rgba_png_per_layer():
    """The layered model's decoder output (n * layers, H, W, 4) becomes one RGBA PNG entry per layer;
    jpeg (no alpha) is refused naming output_format."""
    from ditserve.deployments.http import ImagesRequest, encode_images

    layers = np.random.RandomState(0).randint(0, 256, (3, 32, 48, 4), dtype=np.uint8)
    data = encode_images(layers, ImagesRequest(prompt="x"))
    assert len(data) == 3
    for entry, expected in zip(data, layers):
        with Image.open(io.BytesIO(base64.b64decode(entry.b64_json))) as image:
            assert image.mode == "RGBA" and np.array_equal(np.asarray(image), expected)
    with pytest.raises(RequestError, match="output_format"):
        encode_images(layers, ImagesRequest(prompt="x", output_format="jpeg"))
