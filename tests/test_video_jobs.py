"""Video jobs over HTTP (``/v1/videos``) and cancellation that reaches the DiT ranks, on one served
tiny Wan2.2 app (two Router replicas, the Jobs deployment, one DiT rank, one VAE worker).

A job is created, polled (progress only grows), completes, and its MP4 decodes (PyAV) with the
requested frames, size and fps, its frames equal the in-process reference runner's; the same job
is read through both Router replicas; a running job's DELETE stops the ranks within two steps and
the replica serves the next job; a synchronous ``generate_video`` call cancelled with ``.cancel()``
does the same; bad input is a 4xx naming the field. Cancellation is asserted on rank 0's step
counter (``cancelled_at_step`` where the cancel reached it, ``stopped_at_step`` where every rank
stopped), never on time: the long requests run 200 steps of a 32x32 single-frame video.
"""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request

import av
import numpy as np
import pytest
import torch
from PIL import Image
from ray import serve

from ditserve.deployments import Engine, EngineConfig, GenerationRequest
from ditserve.deployments.app import build_app
from ditserve.deployments.config import AppConfig
from ditserve.models.tiny import make_tiny

pytestmark = pytest.mark.timeout(600)

APP = "video-jobs-test"
JOB = dict(prompt="a red circle moving right", size="64x48", seconds="0.5", num_inference_steps=3, seed=7)
LONG = dict(prompt="a long job", size="32x32", num_frames=1, num_inference_steps=200, seed=1)  # cancelled midway


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return make_tiny("wan", tmp_path_factory.mktemp("video-jobs") / "wan")


@pytest.fixture(scope="module")
def served(ray_cluster, wan):
    cfg = AppConfig.model_validate(dict(
        engine={"model": str(wan), "device": "cpu", "dtype": "float32"}, accelerator="cpu", distributed_timeout_s=60,
        router={"num_cpus": 0.05, "autoscaling": {"min_replicas": 2, "max_replicas": 2}},
        video_jobs={"max_seconds": 2.0},
    ))
    handle = serve.run(build_app(cfg), name=APP, route_prefix="/")
    yield {"handle": handle, "url": ray_cluster["url"], "jobs": serve.get_deployment_handle("Jobs", APP)}
    serve.delete(APP)


def _http(url: str, method: str = "GET", body: dict | None = None) -> tuple[int, bytes, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def _json(url: str, method: str = "GET", body: dict | None = None) -> tuple[int, dict]:
    status, data, _ = _http(url, method, body)
    return status, json.loads(data)


def _wait(predicate, what: str, tries: int = 600, period: float = 0.05):
    """Poll until ``predicate()`` returns a truthy value (bounded by tries, not asserted on time)."""
    for _ in range(tries):
        value = predicate()
        if value:
            return value
        time.sleep(period)
    raise AssertionError(f"never saw {what}")


def _reference_frames(wan, **fields) -> np.ndarray:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the served ranks compute with one thread
    try:
        engine = Engine(EngineConfig(model=str(wan), device="cpu", dtype="float32"))
        images = engine.generate(GenerationRequest(**fields), output_type="np").images
        return (images * 255).round().astype("uint8")  # rounded as diffusers' numpy_to_pil
    finally:
        torch.set_num_threads(threads)


def test_job_progress_mp4_and_frames_match_the_reference(served, wan):
    url = served["url"] + "/v1/videos"
    status, job = _json(url, "POST", JOB)
    assert status == 200, job
    assert job["object"] == "video" and job["status"] in ("queued", "in_progress") and job["id"].startswith("video_")
    assert job["num_frames"] == 9 and job["fps"] == 16 and job["size"] == "64x48"  # 0.5 s x 16 fps -> 4k + 1
    seen = []

    def done():
        _, view = _json(f"{url}/{job['id']}")
        seen.append((view["progress"], view["steps_done"]))
        return view if view["status"] in ("completed", "failed", "cancelled") else None

    final = _wait(done, "the job finish")
    assert final["status"] == "completed" and final["progress"] == 100 and final["completed_at"] >= job["created_at"]
    assert seen == sorted(seen), seen  # progress only grows
    status, mp4, headers = _http(f"{url}/{job['id']}/content")
    assert status == 200 and headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 16 and (stream.width, stream.height) == (64, 48) and len(decoded) == 9
    status, npy, _ = _http(f"{url}/{job['id']}/content?variant=frames")
    frames = np.load(io.BytesIO(npy))
    assert frames.dtype == np.uint8 and frames.shape == (9, 48, 64, 3)
    expected = _reference_frames(wan, **{k: v for k, v in JOB.items() if k != "seconds"}, num_frames=9)[0]
    assert np.abs(frames.astype(int) - expected).max() <= 1
    status, png, headers = _http(f"{url}/{job['id']}/content?variant=thumbnail")
    assert status == 200 and headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), frames[0])
    status, page = _json(url + "?limit=1")
    assert status == 200 and page["data"][0]["id"] == job["id"] and page["object"] == "list"

    # the same job through both Router replicas: Serve's proxy prefers the replica on its own node,
    # so each replica is asked through a broadcast of the handle (one call per live replica)
    replicas = {info["replica_id"] for info in served["handle"].broadcast("info").results()}
    views = served["handle"].broadcast("video", job["id"]).results()
    assert len(replicas) == 2 and len(views) == 2 and all(v.model_dump(mode="json") == final for v in views)
    assert headers["x-ditserve-replica"] in replicas  # HTTP answers name the replica


def test_delete_of_a_running_job_stops_the_ranks_within_two_steps(served):
    url = served["url"] + "/v1/videos"
    status, job = _json(url, "POST", LONG)
    assert status == 200, job
    _wait(lambda: _json(f"{url}/{job['id']}")[1]["steps_done"] >= 3, "the long job running")
    status, body = _json(f"{url}/{job['id']}/content")
    assert status == 409 and body["error"]["param"] == "id" and "in_progress" in body["error"]["message"]
    status, body = _json(f"{url}/{job['id']}", "DELETE")
    assert status == 200 and body == {"id": job["id"], "object": "video.deleted", "deleted": True}
    view = _wait(lambda: (v := _json(f"{url}/{job['id']}")[1])["stopped_at_step"] is not None and v,
                 "the ranks report where they stopped")
    assert view["status"] == "cancelled"
    assert 3 <= view["cancelled_at_step"] <= view["stopped_at_step"] <= view["cancelled_at_step"] + 2
    assert view["stopped_at_step"] < LONG["num_inference_steps"]
    # the replica is free: the next job completes
    status, nxt = _json(url, "POST", dict(LONG, num_inference_steps=2, seed=2))
    assert _wait(lambda: _json(f"{url}/{nxt['id']}")[1]["status"] == "completed", "the next job complete")
    assert _json(f"{url}/{job['id']}/content")[0] == 409  # a cancelled job has no content
    status, body = _json(f"{url}/video_unknown", "DELETE")
    assert status == 404 and body["error"]["param"] == "id"


def test_cancelled_sync_call_stops_the_ranks_and_frees_the_replica(served):
    response = served["handle"].generate_video.remote(GenerationRequest(**LONG))
    progress = served["jobs"].progress
    _wait(lambda: ((progress.remote(response.request_id).result() or {}).get("steps_done") or 0) >= 3,
          "the sync request running")
    response.cancel()
    seen = _wait(lambda: (p := progress.remote(response.request_id).result()) and p.get("stopped_at_step") is not None
                 and p, "the ranks report where they stopped")
    assert 3 <= seen["cancelled_at_step"] <= seen["stopped_at_step"] <= seen["cancelled_at_step"] + 2
    # the next request starts at once (the abandoned one stopped far before its 200 steps)
    result = served["handle"].generate_video.remote(GenerationRequest(**dict(LONG, num_inference_steps=2))).result()
    assert result.frames.shape == (1, 1, 32, 32, 3) and result.frames.dtype == np.uint8 and result.fps == 16


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/videos", dict(JOB, seconds=None, num_frames=6), "num_frames"),  # not 4k + 1
    ("/v1/videos", dict(JOB, size="72x48"), "size"),  # off the 16-pixel grid
    ("/v1/videos", dict(JOB, seconds="30"), "seconds"),  # past max_seconds
    ("/v1/videos", dict(JOB, seconds="four"), "seconds"),
    ("/v1/videos", dict(JOB, n=2), "n"),
    ("/v1/videos", dict(JOB, model="not-served"), "model"),
    ("/v1/images/generations", {"prompt": "a cat"}, "model"),  # a video model: use /v1/videos
    ("/v1/videos/video_x/content?variant=gif", None, "variant"),
    ("/v1/videos", dict(JOB, input_reference="data:image/png;base64,{png}"), "input_reference"),  # T2V: no image
])
def test_bad_input_is_a_4xx_naming_the_field(served, path, body, param):
    if body and "input_reference" in body:
        body = dict(body, input_reference=body["input_reference"].format(png=_png_b64()))
    status, answer = _json(served["url"] + path, "POST" if body is not None else "GET", body)
    assert 400 <= status < 500 and answer["error"]["param"] == param, answer
    if path == "/v1/images/generations":
        assert "/v1/videos" in answer["error"]["message"]


def test_job_store_keeps_results_within_ttl_bytes_and_job_count():
    from ditserve.deployments.config import VideoJobsOptions
    from ditserve.deployments.jobs import Job, JobStore
    from ditserve.deployments.schema import RequestError

    now = [1000.0]
    store = JobStore(VideoJobsOptions(result_ttl_s=60, max_result_bytes=250, max_jobs=3), clock=lambda: now[0])

    def job(i: int, done: bool) -> Job:
        j = Job(id=f"video_{i}", model="m", size="16x16", num_frames=1, fps=16, num_inference_steps=2, seed=i,
                created_at=int(now[0]))
        if done:
            j.status, j.completed_at, j.mp4 = "completed", int(now[0]), b"x" * 100
        return j

    for i in range(3):
        store.add(job(i, done=i < 2))
    assert [j.id for j in store.newest_first(10, None)] == ["video_2", "video_1", "video_0"]
    assert [j.id for j in store.newest_first(1, "video_2")] == ["video_1"]
    store.add(job(3, done=True))  # past max_jobs: the oldest finished job goes; past the bytes: the next oldest
    assert [j.id for j in store.newest_first(10, None)] == ["video_3", "video_2", "video_1"]
    store.add(job(4, done=True))
    assert "video_1" not in store.jobs and sum(j.result_bytes for j in store.jobs.values()) <= 250
    now[0] += 61  # past result_ttl_s: finished jobs go, the running one stays
    assert list(store.jobs) == ["video_2", "video_3", "video_4"] and [j.id for j in store.newest_first(10, None)] == [
        "video_2"]
    with pytest.raises(RequestError, match="no video job 'video_3'"):
        store.get("video_3")
    for i in (5, 6):
        store.add(job(i, done=False))
    with pytest.raises(RequestError, match="max_jobs") as err:
        store.add(job(7, done=False))
    assert err.value.status == 429


# ---- input_reference (image-to-video): parsed and checked without a cluster -------------------------

def _png_b64(side: int = 32) -> str:
    import base64

    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 200, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class _JobsBackend:
    """Creates jobs as the Jobs deployment checks them (``jobs.new_job``), without running them."""

    def __init__(self, served) -> None:
        from ditserve.deployments.config import VideoJobsOptions

        self.served, self.opts, self.resolved = served, VideoJobsOptions(max_seconds=2.0), []

    async def create_video(self, req):
        from ditserve.deployments.http import VideoJob
        from ditserve.deployments.jobs import new_job

        job, resolved = new_job(req, self.served, self.opts)
        self.resolved.append(resolved)
        return VideoJob.model_validate(job.view(self.opts.result_ttl_s))

    def failed(self, status: int) -> None:
        pass


def _post(app, body: bytes, content_type: str) -> tuple[int, dict]:
    import asyncio

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/videos", "raw_path": b"/v1/videos", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())],
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 1)}
    messages, sent = [{"type": "http.request", "body": body, "more_body": False}], []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def _multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    boundary = "ditserveboundary"
    parts = [f'--{boundary}\r\ncontent-disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts += [f'--{boundary}\r\ncontent-disposition: form-data; name="{k}"; filename="f"\r\n'
              f"content-type: application/octet-stream\r\n\r\n".encode() + v + b"\r\n" for k, v in files.items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_input_reference_multipart_and_base64_checked_by_images_in(tmp_path_factory):
    """``POST /v1/videos`` takes ``input_reference`` as OpenAI's multipart file or as base64 in JSON, for
    the image-to-video models; it passes images_in's checks, errors naming ``input_reference``; an I2V
    request without it is a 4xx naming it. (Ray-free: the served app of this module deploys the T2V
    tiny model only, where an image is refused over HTTP above.)"""
    import base64

    from ditserve.deployments import EngineConfig
    from ditserve.deployments.http import build_http_app
    from ditserve.deployments.served import describe_served_model

    path = make_tiny("wan-i2v", tmp_path_factory.mktemp("video-jobs-i2v") / "wan-i2v")
    backend = _JobsBackend(describe_served_model(EngineConfig(model=str(path), device="cpu")))
    app = build_http_app(backend, max_request_bytes=1 << 20)
    png = _png_b64()
    body, content_type = _multipart({"prompt": "a cat", "size": "64x48", "seconds": "0.25"},
                                    {"input_reference": base64.b64decode(png)})
    status, job = _post(app, body, content_type)
    assert status == 200 and job["object"] == "video" and job["size"] == "64x48", job
    status, job = _post(app, json.dumps({"prompt": "a cat", "size": "64x48", "num_frames": 5,
                                         "input_reference": "data:image/png;base64," + png}).encode(), "application/json")
    assert status == 200 and job["num_frames"] == 5, job
    first, second = backend.resolved
    assert first.images[0].shape == second.images[0].shape == (32, 32, 3) and first.image_keys == second.image_keys
    bad = [
        ({"prompt": "a cat"}, "needs an input image"),  # I2V without an image
        ({"prompt": "a cat", "input_reference": "not base64!"}, "not valid base64"),
        ({"prompt": "a cat", "input_reference": base64.b64encode(b"GIF89a....").decode()}, "GIF is not accepted"),
        ({"prompt": "a cat", "input_reference": _png_b64(8)}, "smaller than 16 pixels"),
    ]
    for fields, message in bad:
        status, answer = _post(app, json.dumps(fields).encode(), "application/json")
        assert 400 <= status < 500 and answer["error"]["param"] == "input_reference", answer
        assert message in answer["error"]["message"], answer
    body, content_type = _multipart({"prompt": "a cat"}, {"input_reference": b"plain text, not an image"})
    status, answer = _post(app, body, content_type)
    assert status == 415 and answer["error"]["param"] == "input_reference", answer
