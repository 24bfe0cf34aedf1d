"""The device pool on in-process devices: CFG pairing, spreading, concurrency, re-issue."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from models.reference import SCHEDULER_CONFIG
from models.sim import SimDiffusion
from models.tensors import ENCODER_HIDDEN_STATES
from runtime.device import Device, DeviceError
from runtime.driffusion import sample
from runtime.guidance import Conditioning
from runtime.local_devices import LocalDevice, LocalModel
from runtime.pool import DevicePool, PoolError, split_evenly
from runtime.schedulers import make_scheduler
from runtime.triton_clients import parse_endpoint

SIM = SimDiffusion.from_scheduler_config(SCHEDULER_CONFIG)


def sim_devices(count: int, delay_s: float = 0.0, calls: list | None = None) -> list[Device]:
    def denoise(sample, timestep, context):
        if calls is not None:
            calls.append(sample.shape[0])
        time.sleep(delay_s)
        return SIM.denoise(sample, timestep, context)

    return [LocalDevice.from_function(f"sim{i}", denoise) for i in range(count)]


class Conditioned:
    """A pool with one request's conditioning: callable as `denoise`, the pool's attributes."""

    def __init__(self, pool: DevicePool, conditioning: Conditioning) -> None:
        self.pool = pool
        self.denoise = pool.denoiser(conditioning)

    def __getattr__(self, name):
        return getattr(self.pool, name)

    async def __call__(self, x, t):
        return await self.denoise(x, t)


def label_conditioning(label: int, guidance: float) -> Conditioning:
    return Conditioning({ENCODER_HIDDEN_STATES: SIM.encode(np.array([label]))},
                        {ENCODER_HIDDEN_STATES: SIM.encode(np.array([10]))}, guidance)


def conditioned(pool: DevicePool, guidance: float, label: int = 3) -> Conditioned:
    return Conditioned(pool, label_conditioning(label, guidance))


def round_inputs(items: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((items, 1, 8, 8), generator=generator)
    t = torch.linspace(900, 100, items)
    return x, t


def expected_output(x: torch.Tensor, t: torch.Tensor, guidance: float, label: int = 3):
    rows = x.shape[0]
    cond = SIM.denoise(x.numpy(), t.numpy(), np.repeat(SIM.encode(np.array([label])), rows, 0))
    uncond = SIM.denoise(x.numpy(), t.numpy(), np.repeat(SIM.encode(np.array([10])), rows, 0))
    return torch.from_numpy(uncond + guidance * (cond - uncond))


@pytest.mark.parametrize("cfg_parallel, batched", [(False, False), (True, False), (False, True)])
def test_pool_applies_guidance_per_item_in_every_layout(cfg_parallel, batched):
    calls: list[int] = []
    pool = conditioned(DevicePool(sim_devices(2, calls=calls), cfg_parallel=cfg_parallel,
                                  batched=batched), guidance=2.5)
    x, t = round_inputs(3)
    output = asyncio.run(pool(x, t))
    torch.testing.assert_close(output, expected_output(x, t, 2.5), rtol=0, atol=1e-6)
    # rows per call: batched = one call with every (item, half); otherwise halves spread over lanes
    expected_calls = {(False, False): [4, 2], (True, False): [3, 3], (False, True): [6]}
    assert sorted(calls, reverse=True) == expected_calls[(cfg_parallel, batched)]


def test_the_pool_applies_the_familys_combine_rule():
    """A family-supplied rule (here Z-Image's `cond + g (cond - uncond)`) is what comes out, not
    the default classifier-free guidance."""
    def reflected(cond, uncond, guidance):
        return cond + guidance * (cond - uncond)

    x, t = round_inputs(3)
    default = label_conditioning(3, 2.5)
    family = Conditioning(default.cond, default.uncond, 2.5, combine=reflected)
    output = asyncio.run(DevicePool(sim_devices(2)).denoiser(family)(x, t))
    cond = expected_output(x, t, 1.0)
    uncond = expected_output(x, t, 0.0)
    torch.testing.assert_close(output, reflected(cond, uncond, 2.5), rtol=0, atol=1e-5)
    assert not torch.allclose(output, expected_output(x, t, 2.5), atol=1e-2)


def test_a_round_guides_each_item_at_its_own_timesteps_scale():
    """`guidance_at` (Wan 2.2's GUIDANCE_2 below its experts' boundary): one round whose items
    straddle the boundary is one pool round, each item guided at its timestep's scale."""
    x, t = round_inputs(4)  # timesteps 900, 633, 367, 100
    default = label_conditioning(3, 2.5)
    staged = Conditioning(default.cond, default.uncond, 2.5,
                          guidance_at=lambda timestep: 2.5 if timestep >= 500 else 6.0)
    pool = DevicePool(sim_devices(2))
    output = asyncio.run(pool.denoiser(staged)(x, t))
    assert pool.rounds == 1
    expected = torch.cat([expected_output(x[:2], t[:2], 2.5), expected_output(x[2:], t[2:], 6.0)])
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)


def test_image_inputs_added_to_a_conditioning_keep_the_familys_rule():
    """A family with its own rule that also takes image inputs (inpainting's extra denoiser
    inputs) keeps that rule when the inputs join its conditioning."""
    from runtime.pipeline import with_inputs

    def reflected(cond, uncond, guidance):
        return cond + guidance * (cond - uncond)

    default = label_conditioning(1, 2.5)
    family = Conditioning(default.cond, default.uncond, 2.5, combine=reflected)
    extra = {"mask": np.zeros((1, 1, 4, 4), np.float32)}
    joined = with_inputs(family, extra)
    assert joined.combine is reflected and joined.guidance == 2.5
    assert "mask" in joined.cond and "mask" in joined.uncond


def text_length_device(name: str, shapes: list | None = None) -> Device:
    """A device whose output depends on its context's values and length; it records the
    (rows, text length) of every call."""
    def denoise(sample, timestep, context):
        if shapes is not None:
            shapes.append(context.shape[:2])
        scale = 1 + context.mean(axis=(1, 2)) + 0.01 * context.shape[1]
        return sample * scale[:, None, None, None] + 1e-3 * timestep[:, None, None, None]

    return LocalDevice.from_function(name, denoise)


def text_length_conditioning(guidance: float) -> Conditioning:
    generator = np.random.default_rng(0)
    return Conditioning({ENCODER_HIDDEN_STATES: generator.standard_normal((1, 5, 4))},
                        {ENCODER_HIDDEN_STATES: generator.standard_normal((1, 2, 4))}, guidance)


def rows_alone(x: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
    """Each item's cond and uncond row evaluated alone, then guided."""
    device = text_length_device("alone")
    outputs = []
    for row in range(x.shape[0]):
        sample, timestep = x[row : row + 1].numpy(), t[row : row + 1].numpy()
        cond, uncond = (asyncio.run(device(sample, timestep, inputs))
                        for inputs in (conditioning.cond, conditioning.uncond))
        outputs.append(conditioning.combine(cond, uncond, conditioning.guidance))
    return torch.from_numpy(np.concatenate(outputs))


@pytest.mark.parametrize("cfg_parallel, batched, calls", [
    (False, False, [(2, 2), (2, 5), (1, 2), (1, 5)]),  # 2 items, then 1, per lane
    (True, False, [(2, 2), (1, 5), (1, 2), (2, 5)]),  # halves spread: (0u 1u)(0c) | (2u)(1c 2c)
    (False, True, [(3, 2), (3, 5)]),  # the whole round on one device: one call per length
])
def test_rows_of_different_text_lengths_go_in_separate_calls(cfg_parallel, batched, calls):
    """cond [1, 5, D] and uncond [1, 2, D] never stack: each length is its own call, and every
    row's output is what it gives alone."""
    shapes: list = []
    devices = [text_length_device(f"dev{i}", shapes) for i in range(2)]
    conditioning = text_length_conditioning(3.0)
    pool = DevicePool(devices, cfg_parallel=cfg_parallel, batched=batched)
    x, t = round_inputs(3)
    output = asyncio.run(pool.denoiser(conditioning)(x, t))
    torch.testing.assert_close(output, rows_alone(x, t, conditioning), rtol=0, atol=1e-6)
    assert sorted(shapes) == sorted(calls)


def test_rows_of_different_text_lengths_fail_over_together():
    """A device lost mid-chunk: its calls of both lengths are re-issued on the other device."""
    def broken(sample, timestep, context):
        raise RuntimeError("device lost")

    shapes: list = []
    devices = [LocalDevice.from_function("broken", broken), text_length_device("ok", shapes)]
    conditioning = text_length_conditioning(2.0)
    pool = DevicePool(devices)
    x, t = round_inputs(2)
    output = asyncio.run(pool.denoiser(conditioning)(x, t))
    torch.testing.assert_close(output, rows_alone(x, t, conditioning), rtol=0, atol=1e-6)
    assert sorted(shapes) == [(1, 2), (1, 2), (1, 5), (1, 5)]
    assert [failover.device for failover in pool.failovers] == ["broken"]


def test_guidance_one_evaluates_only_the_conditional_branch():
    calls: list[int] = []
    pool = conditioned(DevicePool(sim_devices(2, calls=calls)), guidance=1.0)
    x, t = round_inputs(2)
    output = asyncio.run(pool(x, t))
    torch.testing.assert_close(output, expected_output(x, t, 1.0), rtol=0, atol=1e-6)
    assert calls == [1, 1]


def test_round_runs_concurrently_over_devices():
    delay = 0.2
    pool = conditioned(DevicePool(sim_devices(3, delay_s=delay)), guidance=1.0)
    x, t = round_inputs(3)
    start = time.perf_counter()
    asyncio.run(pool(x, t))
    elapsed = time.perf_counter() - start
    assert elapsed < 2 * delay, f"3 items on 3 devices took {elapsed:.2f} s, not about {delay} s"


def test_single_item_rounds_alternate_between_devices():
    used: list[str] = []

    def device(name: str) -> Device:
        def denoise(sample, timestep, context):
            used.append(name)
            return SIM.denoise(sample, timestep, context)

        return LocalDevice.from_function(name, denoise)

    pool = conditioned(DevicePool([device("a"), device("b")]), guidance=1.0)
    for _ in range(4):
        asyncio.run(pool(*round_inputs(1)))
    assert used == ["a", "b", "a", "b"]


def test_instances_count_as_lanes_and_max_batch_splits_calls():
    calls: list[int] = []

    def denoise(**inputs):
        calls.append(inputs["sample"].shape[0])
        return {"out_sample": SIM.denoise(inputs["sample"], inputs["timestep"],
                                          inputs["encoder_hidden_states"])}

    device = Device(LocalModel("sim", denoise), instances=2, max_batch=1)
    pool = conditioned(DevicePool([device]), guidance=2.0)
    assert pool.width == 2
    x, t = round_inputs(2)
    torch.testing.assert_close(asyncio.run(pool(x, t)), expected_output(x, t, 2.0),
                               rtol=0, atol=1e-6)
    assert calls == [1, 1, 1, 1]


def test_failed_device_chunk_is_reissued_on_the_remaining_devices():
    def broken(sample, timestep, context):
        raise RuntimeError("device lost")

    devices = [LocalDevice.from_function("broken", broken), *sim_devices(1)]
    pool = conditioned(DevicePool(devices), guidance=2.0)
    x, t = round_inputs(2)
    output = asyncio.run(pool(x, t))
    torch.testing.assert_close(output, expected_output(x, t, 2.0), rtol=0, atol=1e-6)
    assert pool.lost == {"broken"} and len(pool.lanes) == 1
    assert pool.width == 2  # the natural window does not depend on the devices' health


def test_pool_raises_when_every_device_failed():
    def broken(sample, timestep, context):
        raise RuntimeError("device lost")

    pool = conditioned(DevicePool([LocalDevice.from_function("broken", broken)]), guidance=1.0)
    with pytest.raises(PoolError, match="broken"):
        asyncio.run(pool(*round_inputs(1)))


def test_device_deadline_raises_device_error():
    device = sim_devices(1, delay_s=0.5)[0]
    device.deadline_s = 0.05
    x, t = round_inputs(1)
    context = {ENCODER_HIDDEN_STATES: SIM.encode(np.array([1]))}
    with pytest.raises(DeviceError, match="no answer within"):
        asyncio.run(device(x.numpy(), t.numpy(), context))


@pytest.mark.parametrize("mode", ["sequential", "conservative", "aggressive"])
def test_sampling_through_the_pool_matches_a_plain_denoiser(mode):
    guidance, label, steps = 2.0, 4, 12

    async def plain(x, t):
        return expected_output(x, t, guidance, label)

    async def run(denoise):
        scheduler = make_scheduler("ddim", steps, SCHEDULER_CONFIG)
        latents = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(7))
        return await sample(denoise, scheduler, latents, mode=mode, window=2)

    pool = conditioned(DevicePool(sim_devices(2)), guidance, label)
    torch.testing.assert_close(asyncio.run(run(pool)), asyncio.run(run(plain)), rtol=0, atol=1e-6)


def test_pool_rejects_rounds_that_are_not_whole_items():
    pool = DevicePool(sim_devices(1))
    denoise = pool.denoiser(Conditioning({ENCODER_HIDDEN_STATES: np.zeros((2, 1, 11))}))
    with pytest.raises(ValueError, match="not whole items of latent batch 2"):
        asyncio.run(denoise(*round_inputs(3)))


def test_pool_needs_devices_and_conditioning_that_agrees():
    with pytest.raises(ValueError, match="at least one device"):
        DevicePool([])
    with pytest.raises(ValueError, match="must match cond's .* except along axis 1"):
        Conditioning({ENCODER_HIDDEN_STATES: np.zeros((1, 1, 11))},
                     {ENCODER_HIDDEN_STATES: np.zeros((1, 1, 12))}, 2.0)
    with pytest.raises(ValueError, match="must have cond's inputs"):
        Conditioning({ENCODER_HIDDEN_STATES: np.zeros((1, 1, 11))}, {}, 2.0)
    # a negative prompt of another text length is allowed
    Conditioning({ENCODER_HIDDEN_STATES: np.zeros((1, 1, 11))},
                 {ENCODER_HIDDEN_STATES: np.zeros((1, 2, 11))}, 2.0)
    with pytest.raises(ValueError, match="guidance must be >= 0"):
        label_conditioning(3, -1.0)


def test_concurrent_requests_through_one_pool_keep_their_own_conditioning():
    """Conditioning travels with each request: interleaved rounds of different labels and
    guidance through one pool give each request its solo result."""
    pool = DevicePool(sim_devices(2, delay_s=0.005))
    requests = [(label, guidance) for label in range(4) for guidance in (1.0, 3.0)]

    async def one(label: int, guidance: float) -> torch.Tensor:
        scheduler = make_scheduler("ddim", 6, SCHEDULER_CONFIG)
        latents = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(label))
        return await sample(pool.denoiser(label_conditioning(label, guidance)), scheduler,
                            latents, mode="aggressive", window=2)

    async def together():
        return await asyncio.gather(*(one(*request) for request in requests))

    solo = [asyncio.run(one(*request)) for request in requests]
    for alone, concurrent in zip(solo, asyncio.run(together())):
        assert torch.equal(alone, concurrent)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TorchScript exporter
def test_local_onnx_and_torch_devices_match_the_module(tmp_path):
    module = TinyUNet().eval()
    path = tmp_path / "unet.onnx"
    export_tiny_unet(module, path)
    x, t = round_inputs(2)
    context = torch.randn(2, 1, 11)
    with torch.no_grad():
        expected = module(x, t, context).numpy()
    for device in (LocalDevice.from_onnx(path, threads=1), LocalDevice.from_torch(module)):
        output = asyncio.run(device(x.numpy(), t.numpy(),
                                    {ENCODER_HIDDEN_STATES: context.numpy()}))
        np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-5)


def test_split_evenly_and_endpoint_parsing():
    assert split_evenly(list(range(5)), 3) == [[0, 1], [2, 3], [4]]
    assert split_evenly([1], 3) == [[1], [], []]
    assert parse_endpoint(" localhost:8001 ") == "localhost:8001"
    assert parse_endpoint("http://10.0.0.7:8000") == "http://10.0.0.7:8000"
    for bad in ("localhost", "host:0", ":8001", "host:http", "http://host", "http://h/x:80"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_endpoint(bad)


class TinyUNet(torch.nn.Module):
    """A small UNet-shaped network: (sample, timestep, encoder_hidden_states) -> out_sample."""

    def __init__(self, channels: int = 1, embed_dim: int = 11) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.context = torch.nn.Linear(embed_dim, channels)

    def forward(self, sample, timestep, encoder_hidden_states):
        scale = torch.cos(timestep / 1000.0).reshape(-1, 1, 1, 1)
        shift = self.context(encoder_hidden_states.mean(1)).reshape(sample.shape[0], -1, 1, 1)
        return torch.tanh(self.conv(sample)) * scale + shift


def export_tiny_unet(module: torch.nn.Module, path, embed_dim: int = 11) -> None:
    inputs = (torch.randn(2, 1, 8, 8), torch.tensor([10.0, 20.0]), torch.randn(2, 1, embed_dim))
    torch.onnx.export(
        module, inputs, str(path), dynamo=False, opset_version=17,
        input_names=["sample", "timestep", "encoder_hidden_states"], output_names=["out_sample"],
        dynamic_axes={"sample": {0: "batch"}, "timestep": {0: "batch"},
                      "encoder_hidden_states": {0: "batch"}, "out_sample": {0: "batch"}},
    )


def test_http_client_retries_a_kept_alive_connection_the_server_closed_once():
    """A server may close an idle kept-alive connection; the next request on it goes again on
    a new connection instead of failing (which would take a healthy device out of service)."""
    from runtime.triton_http import HttpTriton

    async def scenario():
        connections = []

        async def answer_once_then_close(reader, writer):
            connections.append(writer)
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
            writer.close()  # no "Connection: close": the client keeps the connection

        server = await asyncio.start_server(answer_once_then_close, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        http = HttpTriton("127.0.0.1", port)
        try:
            answers = [await http.get_json("/v2/health/live", 5.0) for _ in range(3)]
        finally:
            await http.close()
            server.close()
            await server.wait_closed()
        with pytest.raises(OSError):  # nothing listens any more: the error is the caller's
            await HttpTriton("127.0.0.1", port).get_json("/v2/health/live", 5.0)
        return answers, len(connections)

    answers, connections = asyncio.run(scenario())
    assert answers == [{}, {}, {}] and connections == 3
