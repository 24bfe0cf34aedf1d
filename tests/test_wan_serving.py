"""Wan behind the serving stack: a Wan folder's pipeline spec as export derives it (WanPipeline's
defaults, the VAE's temporal factor, no VAE encoder), the `driffusion` model's config of a video
model (FRAMES and GUIDANCE_2 in, VIDEO [F, H, W, 3] out; image models keep IMAGE) as the
request checker reads it, and the frames `driffusion generate` writes (an MP4 read back frame
by frame, or PNGs in a folder).

Served (one module-scoped server, `driffusion serve`'s build path): a Wan 2.2 two-expert folder
(both experts one torch denoiser, GUIDANCE_2 != GUIDANCE) by default, a Wan 2.1 folder (the
transformer as an ONNX Runtime engine) under slow; the VAE decoder by torch at any frame count.
MODE=sequential gives WanPipeline's frames (non-square, 5 frames, CFG with a negative prompt
that the cleaning changes) over gRPC, HTTP/JSON and `generate` (PNG frames, and an MP4 read
back); GUIDANCE in GUIDANCE_2's place lies beyond the bound; windows 2 and 4 take fewer rounds
(straddling the expert boundary), window 1 is bit-identical; FRAMES past --max-video-pixels is
refused naming FRAMES; a client's deadline cancels a video request (its rounds stop); a dead
device's calls go to the other and the frames do not change. `driffusion_stream` (written for
video models), through a request guard in front of the same server: one progress response a
round, then driffusion's video bit for bit (two requests at once too); a cancelled stream stops
its request; bad fields end the stream naming them; HTTP gets 501 naming the gRPC stream;
scripts/stream_progress.py prints each round and saves the frames. The
in-process tests (tests/test_wan.py) show the negative prompt, the
cleaning, the state zeroing and the second expert each matter.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from export.presets import load_bundle, pipeline_spec
from export.specs import (
    UMT5EncoderSpec,
    WanTransformerSpec,
    WanVAEDecoderSpec,
)
from models.pipeline_spec import WAN
from runtime.pipeline import RequestError
from runtime.video_files import check_video_out, read_mp4, save_video
from tests.video_folders import FRAMES, HEIGHT, WIDTH, wan_folder
from triton_models.pipeline_io import request_from_tensors
from triton_models.repository import driffusion_tensors
from triton_models.request_check import BadRequest, ModelSpec, parse_http_infer

EXPORT_HEIGHT, EXPORT_WIDTH = (16, HEIGHT, 64), (16, WIDTH, 64)


@pytest.fixture(scope="module")
def wan21(tmp_path_factory):
    folder = wan_folder(tmp_path_factory.mktemp("wan21") / "tiny-wan21")
    bundle = load_bundle(str(folder))
    return bundle, pipeline_spec(bundle, EXPORT_HEIGHT, EXPORT_WIDTH)


def test_a_wan_folder_exports_as_the_wan_family_with_wan_pipeline_defaults(wan21):
    bundle, spec = wan21
    assert bundle.family == WAN
    # text-to-video only: the causal VAE is exported as a decoder, not also as an encoder
    assert list(bundle.modules) == ["text_encoder", "transformer", "vae_decoder"]
    specs = bundle.specs()
    assert [type(specs[name]) for name in bundle.modules] == [
        UMT5EncoderSpec, WanTransformerSpec, WanVAEDecoderSpec]
    assert specs["text_encoder"].sequence_length == specs["transformer"].sequence_length == 512
    assert (spec.family, spec.default_steps, spec.default_guidance) == (WAN, 50, 5.0)
    assert (spec.temporal_scale_factor, spec.default_frames, spec.boundary_ratio) == (4, 81, None)
    assert (spec.vae_scale_factor, spec.size_multiple, spec.latent_channels) == (8, 16, 16)
    assert spec.height_range == (16, 64) and spec.width_range == (16, 64)
    assert not spec.image_encoder
    (encoder,) = spec.text_encoders
    assert (encoder.kind, encoder.max_length, encoder.takes_mask) == ("UMT5EncoderModel", 512,
                                                                      True)
    vae = bundle.modules["vae_decoder"].config
    assert spec.latents_mean == tuple(vae.latents_mean)
    assert spec.latents_std == tuple(vae.latents_std)


def test_a_two_expert_folder_exports_one_denoiser_of_both_experts(tmp_path):
    """Wan 2.2: `transformer` and `transformer_2` are one network, WanExperts at the boundary
    timestep boundary_ratio x num_train_timesteps, served by torch (each row by its own
    expert, whatever rows a device call holds)."""
    from export.specs import WanExpertsSpec
    from export.wan import WanExperts

    bundle = load_bundle(str(wan_folder(tmp_path / "tiny-wan22", boundary_ratio=0.8)))
    assert list(bundle.modules) == ["text_encoder", "transformer", "vae_decoder"]
    experts = bundle.modules["transformer"]
    assert isinstance(experts, WanExperts) and experts.boundary == 800.0
    spec = bundle.specs()["transformer"]
    assert type(spec) is WanExpertsSpec and spec.torch_only
    assert pipeline_spec(bundle, EXPORT_HEIGHT, EXPORT_WIDTH).boundary_ratio == 0.8
    only = load_bundle(str(tmp_path / "tiny-wan22"), ["transformer"])
    assert isinstance(only.modules["transformer"], WanExperts)


def driffusion_config(spec) -> dict:
    """The `driffusion` model's config as Triton's GET /v2/models/driffusion/config gives it."""
    inputs, outputs = driffusion_tensors(spec)
    return {"name": "driffusion", "backend": "python", "max_batch_size": 0,
            "input": [{"name": name, "data_type": dtype, "dims": dims, "optional": True}
                      for name, dtype, dims in inputs],
            "output": [{"name": name, "data_type": dtype, "dims": dims}
                       for name, dtype, dims in outputs]}


def test_a_video_model_takes_frames_and_guidance_2_and_answers_video(wan21):
    config = driffusion_config(wan21[1])
    inputs = {entry["name"]: entry for entry in config["input"]}
    outputs = {entry["name"]: entry for entry in config["output"]}
    assert inputs["FRAMES"]["data_type"] == "TYPE_INT32" and inputs["FRAMES"]["dims"] == [1]
    assert inputs["GUIDANCE_2"]["data_type"] == "TYPE_FP32"
    assert list(outputs) == ["VIDEO", "ROUNDS", "EVALUATIONS"]
    assert outputs["VIDEO"]["data_type"] == "TYPE_UINT8"
    assert outputs["VIDEO"]["dims"] == [-1, -1, -1, 3]


def test_the_request_checker_takes_video_inputs_only_from_a_video_models_config(wan21):
    from models.sim import sim_spec

    video = ModelSpec.from_config(driffusion_config(wan21[1]))
    image = ModelSpec.from_config(driffusion_config(sim_spec()))
    body = json.dumps({"inputs": [
        {"name": "PROMPT", "shape": [1], "datatype": "BYTES", "data": ["a fox"]},
        {"name": "FRAMES", "shape": [1], "datatype": "INT32", "data": [9]},
        {"name": "GUIDANCE_2", "shape": [1], "datatype": "FP32", "data": [3.0]}],
        "outputs": [{"name": "VIDEO"}]}).encode()
    checked = parse_http_infer(body, None, "driffusion", "", video)
    assert [tensor.name for tensor in checked.inputs] == ["PROMPT", "FRAMES", "GUIDANCE_2"]
    with pytest.raises(BadRequest, match="FRAMES"):
        parse_http_infer(body, None, "driffusion", "", image)
    image_only = {"IMAGE", "ROUNDS", "EVALUATIONS"}
    assert set(image.outputs) == image_only and "IMAGE" not in video.outputs


def test_frames_and_guidance_2_reach_the_request():
    request = request_from_tensors({"FRAMES": np.array([9], np.int32),
                                    "GUIDANCE_2": np.array([3.0], np.float32)})
    assert (request.frames, request.guidance_2) == (9, 3.0)
    with pytest.raises(RequestError, match="frames: FRAMES must hold exactly one value"):
        request_from_tensors({"FRAMES": np.array([9, 13], np.int32)})


def frames_of(seed: int = 0) -> np.ndarray:
    """Smooth frames (codecs keep them close): a moving gradient per colour channel."""
    rows, columns = np.mgrid[0:HEIGHT, 0:WIDTH]
    frames = [np.stack([(rows * 4 + 16 * index + seed) % 256, (columns * 4) % 256,
                        np.full_like(rows, 40 * index)], axis=-1) for index in range(FRAMES)]
    return np.stack(frames).astype(np.uint8)


def test_an_mp4_reads_back_with_every_frame(tmp_path):
    frames = frames_of()
    (path,) = save_video(frames, tmp_path / "clip.mp4")
    decoded = read_mp4(path)
    assert decoded.shape == frames.shape
    difference = np.abs(decoded.astype(np.int16) - frames.astype(np.int16))
    assert difference.mean() < 2, "H.264 at this quality stays close to the frames"


def test_a_folder_gets_one_png_a_frame(tmp_path):
    from PIL import Image

    frames = frames_of()
    written = save_video(frames, tmp_path / "frames/")
    assert [path.name for path in written] == [f"frame_{i:04d}.png" for i in range(FRAMES)]
    np.testing.assert_array_equal(np.stack([np.asarray(Image.open(p)) for p in written]),
                                  frames)


def test_a_video_is_not_written_to_an_image_file(tmp_path):
    with pytest.raises(ValueError, match=r"MP4 file \(clip.mp4\) or a folder"):
        check_video_out(tmp_path / "image.png")
    with pytest.raises(ValueError, match="even sides"):
        save_video(np.zeros((2, 15, 16, 3), np.uint8), tmp_path / "odd.mp4")


# ---------------------------------------------------------------------------------------------
# A tiny Wan 2.1 folder served by `driffusion serve`'s build path (the transformer as an ONNX
# Runtime engine, the VAE decoder by torch): the one served fixture of the family

STEPS = 4  # timesteps 999 and 900 by the high-noise expert, 750 and 500 by the low-noise one
GUIDANCE, GUIDANCE_2 = 5.0, 2.0
BOUNDARY_RATIO = 0.8
PROMPT = "a red  fox &amp; a dog in the snowy forest"
NEGATIVE = "blurry low quality"


# wan22 (default): both experts in one torch denoiser; wan21 (slow: the 3-D transformer's
# dynamo ONNX export adds ~90 s; tests/test_wan.py's slow export test validates that ONNX)
@pytest.fixture(scope="module", params=["wan22", pytest.param("wan21", marks=pytest.mark.slow)])
def served(request, tmp_path_factory, torch_single_thread):
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    from export.onnx_export import ExportOptions
    from tests.diffusers_folders import load_pipeline
    from tests.servers import serving_folder

    root = tmp_path_factory.mktemp(request.param)
    ratio = BOUNDARY_RATIO if request.param == "wan22" else None
    folder = wan_folder(root / f"tiny-{request.param}", boundary_ratio=ratio)
    options = ExportOptions(batch_range=(1, 2, 4), height=HEIGHT, width=WIDTH)
    with serving_folder(folder, root, export=options) as server:
        yield server, load_pipeline(folder)


def two_experts(served) -> bool:
    return served[1].transformer_2 is not None


def request_fields(seed: int, **fields) -> dict:
    return {"PROMPT": PROMPT, "NEGATIVE_PROMPT": NEGATIVE, "STEPS": STEPS, "SEED": seed,
            "GUIDANCE": GUIDANCE, "HEIGHT": HEIGHT, "WIDTH": WIDTH, "FRAMES": FRAMES,
            "MODE": "sequential", **fields}


def served_request(served, seed: int, **fields) -> dict:
    """The test's request; a two-expert folder's with GUIDANCE_2 (which a one-expert one
    refuses)."""
    extra = {"GUIDANCE_2": GUIDANCE_2} if two_experts(served) else {}
    return request_fields(seed, **extra, **fields)


GRPC_TYPES = {str: ("BYTES", np.object_), int: ("INT32", np.int32),
              float: ("FP32", np.float32)}


def grpc_inputs(fields: dict) -> list:
    """tritonclient gRPC inputs of a request's fields (SEED as INT64)."""
    import tritonclient.grpc as grpc_client

    inputs = []
    for name, value in fields.items():
        datatype, dtype = ("INT64", np.int64) if name == "SEED" else GRPC_TYPES[type(value)]
        tensor = grpc_client.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(np.array([value.encode() if isinstance(value, str)
                                             else value], dtype=dtype))
        inputs.append(tensor)
    return inputs


def grpc_video(url: str, timeout_s: float = 300, **fields) -> tuple[np.ndarray, int, int]:
    """VIDEO, ROUNDS and EVALUATIONS of one gRPC request."""
    import tritonclient.grpc as grpc_client

    client = grpc_client.InferenceServerClient(url)
    try:
        answer = client.infer("driffusion", grpc_inputs(fields), client_timeout=timeout_s)
    finally:
        client.close()
    return (answer.as_numpy("VIDEO"), int(answer.as_numpy("ROUNDS")[0]),
            int(answer.as_numpy("EVALUATIONS")[0]))


def wan_pipeline_frames(pipeline, seed: int) -> np.ndarray:
    import torch

    second = {"guidance_scale_2": GUIDANCE_2} if pipeline.transformer_2 is not None else {}
    with torch.no_grad():
        frames = pipeline(prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH,
                          num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                          generator=torch.Generator("cpu").manual_seed(seed),
                          output_type="np", **second).frames[0]
    return (frames * 255).round().astype(np.uint8)


def within_bound(frames: np.ndarray, expected: np.ndarray) -> bool:
    assert frames.shape == expected.shape == (FRAMES, HEIGHT, WIDTH, 3)
    difference = np.abs(frames.astype(np.int16) - expected.astype(np.int16))
    print(f"max |diff| {difference.max()}, mean {difference.mean():.4f}")
    return bool(difference.max() <= 4 and difference.mean() <= 0.5)


def test_served_sequential_equals_wan_pipeline_over_grpc(served):
    server, pipeline = served
    frames, rounds, evaluations = grpc_video(server.grpc_url, **served_request(served, 11))
    expected = wan_pipeline_frames(pipeline, 11)
    assert within_bound(frames, expected)
    assert (rounds, evaluations) == (STEPS, STEPS)
    if two_experts(served):  # GUIDANCE in GUIDANCE_2's place is another video
        plain = grpc_video(server.grpc_url, **request_fields(11))[0]
        assert not within_bound(plain, expected), "GUIDANCE_2 must matter"


def test_served_windows_take_fewer_rounds_and_window_one_is_sequential(served):
    url = served[0].grpc_url
    sequential = grpc_video(url, **served_request(served, 12))[0]
    one = grpc_video(url, **served_request(served, 12, MODE="aggressive", WINDOW=1))[0]
    np.testing.assert_array_equal(one, sequential)
    for window in (2, 4):
        _, rounds, evaluations = grpc_video(url, **served_request(served, 12, MODE="aggressive",
                                                                  WINDOW=window))
        assert rounds < STEPS and evaluations == STEPS


def test_served_frames_beyond_the_limit_are_refused_naming_frames(served):
    from tritonclient.utils import InferenceServerException

    too_many = 74_649_600 // (HEIGHT * WIDTH) + 8  # past --max-video-pixels' default
    with pytest.raises(InferenceServerException, match="FRAMES: .*FRAMES x HEIGHT x WIDTH"):
        grpc_video(served[0].grpc_url, **served_request(served, 13, FRAMES=too_many))


def test_served_http_json_and_generate_give_the_grpc_frames(served, tmp_path):
    import urllib.request

    from cli import main as driffusion

    server = served[0]
    fields = served_request(served, 14)
    by_grpc = grpc_video(server.grpc_url, **fields)[0]
    datatypes = {str: "BYTES", int: "INT32", float: "FP32"}
    body = {"inputs": [{"name": name, "shape": [1], "data": [value],
                        "datatype": "INT64" if name == "SEED" else datatypes[type(value)]}
                       for name, value in fields.items()],
            "outputs": [{"name": "VIDEO"}]}
    request = urllib.request.Request(f"{server.http_url}/v2/models/driffusion/infer",
                                     data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=300) as reply:
        (output,) = json.loads(reply.read())["outputs"]
    np.testing.assert_array_equal(np.array(output["data"], np.uint8).reshape(output["shape"]),
                                  by_grpc)
    arguments = ["generate", "--endpoints", server.http_url, "--prompt", PROMPT,
                 "--negative-prompt", NEGATIVE, "--seed", "14", "--steps", str(STEPS),
                 "--guidance", str(GUIDANCE), "--height", str(HEIGHT), "--width", str(WIDTH),
                 "--frames", str(FRAMES), "--mode", "sequential", "--quiet"]
    if two_experts(served):
        arguments += ["--guidance-2", str(GUIDANCE_2)]
    assert driffusion([*arguments, "--out", str(tmp_path / "frames/")]) == 0
    from PIL import Image

    pngs = sorted((tmp_path / "frames").glob("frame_*.png"))
    np.testing.assert_array_equal(np.stack([np.asarray(Image.open(p)) for p in pngs]), by_grpc)
    assert driffusion([*arguments, "--out", str(tmp_path / "clip.mp4")]) == 0
    assert read_mp4(tmp_path / "clip.mp4").shape == by_grpc.shape


# a request that its client abandons must not finish before its server notices: the server's
# most steps, which flow_euler runs (200 UniPC steps of the tiny folder took ~2 s, under the CI's
# load less than the cancellation took to arrive)
GIVE_UP = {"STEPS": 1000, "SCHEDULER": "flow_euler"}


def assert_stops_when_the_client_gives_up(served, give_up) -> None:
    """`give_up()` sends a GIVE_UP sequential request and abandons it: the request is counted
    cancelled and its rounds stop (not the steps it asked for)."""
    import time

    from tests.servers import metric

    server = served[0]

    def cancelled() -> float:
        return metric(server, "driffusion_requests_total", outcome="cancelled")

    def rounds() -> float:
        return metric(server, "driffusion_rounds_total", mode="sequential")

    before, rounds_before = cancelled(), rounds()
    give_up()
    gave_up = time.monotonic()
    while cancelled() == before and time.monotonic() - gave_up < 10.0:
        time.sleep(0.05)
    assert cancelled() == before + 1
    ran = rounds() - rounds_before
    time.sleep(0.5)
    assert rounds() - rounds_before == ran < GIVE_UP["STEPS"]  # quiet after: nothing more ran


def test_a_video_request_whose_client_gave_up_stops_within_a_round(served):
    """A client's deadline cancels a video request as it cancels an image one."""
    from tritonclient.utils import InferenceServerException

    def give_up() -> None:
        with pytest.raises(InferenceServerException, match="Deadline"):
            grpc_video(served[0].grpc_url, timeout_s=1.5,
                       **served_request(served, 17, **GIVE_UP))

    assert_stops_when_the_client_gives_up(served, give_up)


# ---------------------------------------------------------------------------------------------
# driffusion_stream (written for video models): progress over a gRPC stream, through the request
# guard that `driffusion serve` puts on the public ports


@pytest.fixture(scope="module")
def guarded(served):
    """A request guard in front of the served server (as `driffusion serve` runs one): its
    public gRPC HOST:PORT and HTTP URL."""
    from triton_models.guard import RequestGuard
    from triton_models.guard_limits import GuardLimits
    from triton_models.serve import free_ports

    server = served[0]
    grpc_port, http_port = free_ports(2)
    guard = RequestGuard(host="127.0.0.1", grpc_port=grpc_port, http_port=http_port,
                         upstream_grpc_port=server.ports["grpc"],
                         upstream_http_port=server.ports["http"], limits=GuardLimits())
    guard.start()
    yield f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
    guard.stop()


def streamed(url: str, fields: dict, cancel_after: int | None = None,
             timeout_s: float = 300) -> list:
    """One driffusion_stream request's responses in order, each (outputs, final flag), or the
    error that ended the stream; with `cancel_after` the client cancels after that many."""
    import queue

    import tritonclient.grpc as grpc_client

    from triton_models.pipeline_io import STREAM_MODEL

    answers: queue.Queue = queue.Queue()
    client = grpc_client.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    seen: list = []
    try:
        client.async_stream_infer(STREAM_MODEL, grpc_inputs(fields),
                                  enable_empty_final_response=True)
        while len(seen) != cancel_after:
            result, error = answers.get(timeout=timeout_s)
            if error is not None:
                return [*seen, error]
            response = result.get_response()
            seen.append(({output.name: result.as_numpy(output.name)
                          for output in response.outputs},
                         response.parameters["triton_final_response"].bool_param))
            if seen[-1][1]:
                break
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    return seen


def test_a_streamed_request_reports_each_round_then_gives_driffusions_video(served, guarded):
    """One progress response a round (ROUNDS 1, 2, ...; STEPS_DONE up to STEPS_TOTAL), then the
    video that driffusion gives the same request, bit for bit."""
    fields = served_request(served, 18, MODE="aggressive", WINDOW=2)
    *progress, (final, last) = streamed(guarded[0], fields)
    assert last and not any(flag for _, flag in progress)
    rounds = [int(outputs["ROUNDS"][0]) for outputs, _ in progress]
    done = [int(outputs["STEPS_DONE"][0]) for outputs, _ in progress]
    assert rounds == list(range(1, len(progress) + 1)) and len(progress) == final["ROUNDS"][0]
    assert done == sorted(set(done)) and done[-1] == STEPS > len(progress)  # window 2: fewer
    assert {int(outputs["STEPS_TOTAL"][0]) for outputs, _ in progress} == {STEPS}
    video, plain_rounds, evaluations = grpc_video(guarded[0], **fields)
    np.testing.assert_array_equal(final["VIDEO"], video)
    assert (final["ROUNDS"][0], final["EVALUATIONS"][0]) == (plain_rounds, evaluations)


def test_streamed_requests_at_once_share_the_one_instance(served, guarded):
    """driffusion_stream is one instance that runs --pipeline-instances (2) requests at once:
    two concurrent streams each get driffusion's video of their own request."""
    from concurrent.futures import ThreadPoolExecutor

    requests = [served_request(served, seed, STEPS=8) for seed in (22, 23)]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda fields: streamed(guarded[0], fields), requests))
    for fields, responses in zip(requests, answers):
        assert len(responses) == 9 and responses[-1][1]
        np.testing.assert_array_equal(responses[-1][0]["VIDEO"],
                                      grpc_video(guarded[0], **fields)[0])
    assert not np.array_equal(answers[0][-1][0]["VIDEO"], answers[1][-1][0]["VIDEO"])


def test_a_bad_streamed_request_gets_an_error_naming_the_field(served, guarded):
    """Refused by the guard (a FRAMES of the wrong type) or by the model (too many frames):
    the request's error response names FRAMES (as Triton answers on a stream: a message, no
    status; tests/test_request_guard.py shows the stream goes on)."""
    from tritonclient.utils import InferenceServerException

    (error,) = streamed(guarded[0], served_request(served, 19, FRAMES=5.0))
    assert isinstance(error, InferenceServerException) and "FRAMES" in error.message()
    assert "INT32" in error.message()
    too_many = 74_649_600 // (HEIGHT * WIDTH) + 8
    (error,) = streamed(guarded[0], served_request(served, 19, FRAMES=too_many))
    assert "FRAMES: " in error.message() and "FRAMES x HEIGHT x WIDTH" in error.message()


def test_a_streamed_request_whose_client_cancels_stops(served, guarded):
    """The client cancels its stream after the first progress response: its request stops."""

    def give_up() -> None:
        ((first, final),) = streamed(guarded[0],
                                     served_request(served, 20, **GIVE_UP),
                                     cancel_after=1)
        assert not final and first["STEPS_TOTAL"][0] == GIVE_UP["STEPS"]

    assert_stops_when_the_client_gives_up(served, give_up)


def test_http_infer_on_the_stream_model_names_the_grpc_stream(served, guarded):
    """Triton's own HTTP answer (501, 'decoupled'), and the guard's: the same status, naming
    the gRPC stream to use."""
    import urllib.error
    import urllib.request

    body = {"inputs": [{"name": "PROMPT", "shape": [1], "datatype": "BYTES", "data": ["a fox"]}]}
    answers = []
    for url in (guarded[1], served[0].http_url):
        request = urllib.request.Request(f"{url}/v2/models/driffusion_stream/infer",
                                         data=json.dumps(body).encode(), method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        answers.append((refused.value.code, json.loads(refused.value.read())["error"]))
    print(answers)
    assert answers[0][0] == answers[1][0] == 501
    assert all("decoupled" in message for _, message in answers)
    assert "ModelStreamInfer" in answers[0][1]


def test_the_example_client_prints_each_round_and_saves_the_video(served, guarded, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    fields = served_request(served, 21)
    flags = [f"--{name.lower().replace('_', '-')}={value}" for name, value in fields.items()]
    script = Path(__file__).resolve().parents[1] / "scripts" / "stream_progress.py"
    run = subprocess.run([sys.executable, str(script), "--url", guarded[0],
                          *flags, "--out", str(tmp_path / "frames/")],
                         capture_output=True, text=True, timeout=300, check=True)
    lines = run.stdout.splitlines()
    assert lines == [f"round {r}: {r}/{STEPS} steps" for r in range(1, STEPS + 1)] + [
        f"done: VIDEO [{FRAMES}, {HEIGHT}, {WIDTH}, 3] in {STEPS} rounds, {STEPS} evaluations"]
    pngs = sorted((tmp_path / "frames").glob("frame_*.png"))
    np.testing.assert_array_equal(np.stack([np.asarray(Image.open(p)) for p in pngs]),
                                  grpc_video(guarded[0], **fields)[0])


def device_stub(server, name: str) -> int:
    """The process id of the python-backend stub that runs device model `name`."""
    from pathlib import Path

    from triton_models.serve import group_members

    marker = f"/{name}/1/model.py".encode()
    (stub,) = [pid for pid in group_members(server.process.pid)
               if marker in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return stub


# last in the module: it leaves one device of the module's server dead (the others go on)
def test_a_dead_device_loses_no_video_request(served):
    """Failover holds for video as for images: the calls of a device whose process died are
    re-issued on the other device, and the request answers the fault-free frames."""
    import os
    import signal
    import time

    server = served[0]
    fields = served_request(served, 18, MODE="aggressive", WINDOW=2, STEPS=8)
    expected, rounds, _ = grpc_video(server.grpc_url, **fields)
    os.kill(device_stub(server, "unet_cpu1"), signal.SIGKILL)
    frames, rounds_after, _ = grpc_video(server.grpc_url, **fields)
    np.testing.assert_array_equal(frames, expected)
    assert rounds_after == rounds
    deadline = time.monotonic() + 10  # the stub's log lines reach the file a moment later
    while "re-issued on unet_cpu0" not in server.log_path.read_text():
        assert time.monotonic() < deadline, "no failover in the server log"
        time.sleep(0.2)
    assert "device unet_cpu1 lost" in server.log_path.read_text()
