"""Single-GPU DRiffusion: a batched pool keeps the requested window (one call per round), and
the one-GPU layouts of the model repository (`serve --single-gpu`)."""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from models.sim import NULL_LABEL, SimDiffusion, sim_spec
from models.tensors import ENCODER_HIDDEN_STATES
from runtime.driffusion import sample
from runtime.guidance import Conditioning
from runtime.local_devices import LocalDevice
from runtime.pipeline import GenerationRequest, resolve
from runtime.pool import DEFAULT_BATCHED_WINDOW, DevicePool
from runtime.schedulers import make_scheduler
from triton_models.repository import RepositoryOptions, device_gpus, write_repository
from triton_models.serve import resolve_gpu_layout

SPEC = sim_spec()
SIM = SimDiffusion.from_scheduler_config(SPEC.scheduler_config)
STEPS = 12


def counting_device(name: str, calls: list[int]) -> LocalDevice:
    def denoise(sample, timestep, context):
        calls.append(sample.shape[0])
        return SIM.denoise(sample, timestep, context)

    return LocalDevice.from_function(name, denoise)


def conditioning(label: int = 3, guidance: float = 2.0) -> Conditioning:
    return Conditioning({ENCODER_HIDDEN_STATES: SIM.encode(np.array([label]))},
                        {ENCODER_HIDDEN_STATES: SIM.encode(np.array([NULL_LABEL]))}, guidance)


def sample_with(pool: DevicePool, mode: str = "aggressive") -> torch.Tensor:
    """A DRiffusion run at the pool's natural window, as the Pipeline's default window is."""
    scheduler = make_scheduler("ddim", STEPS, SPEC.scheduler_config)
    latents = torch.randn((1, *SPEC.latent_shape), generator=torch.Generator().manual_seed(5))
    return asyncio.run(sample(pool.denoiser(conditioning()), scheduler, latents, mode=mode,
                              window=pool.width))


@pytest.mark.parametrize("mode", ["aggressive", "conservative"])
def test_batched_pool_runs_each_round_of_the_window_as_one_call(mode):
    batched_calls: list[int] = []
    batched = DevicePool([counting_device("gpu", batched_calls)], batched=True, window=4)
    spread_calls: list[int] = []
    spread = DevicePool([counting_device(f"dev{i}", spread_calls) for i in range(4)])
    assert batched.width == spread.width == 4

    latents = sample_with(batched, mode)
    torch.testing.assert_close(latents, sample_with(spread, mode), rtol=0, atol=1e-6)
    # one device call per round, of every item of the round (cond + uncond rows: 2 per item)
    assert len(batched_calls) == batched.rounds < STEPS
    assert max(batched_calls) == 2 * 4
    assert sum(batched_calls) == sum(spread_calls)
    assert len(spread_calls) > len(batched_calls)


def test_batched_pool_defaults_to_a_window_of_four_not_one():
    pool = DevicePool([counting_device("gpu", [])], batched=True)
    assert pool.width == DEFAULT_BATCHED_WINDOW == 4
    assert resolve(GenerationRequest(label=3), SPEC, pool.width).window == 4
    assert DevicePool([counting_device("gpu", [])], batched=True, window=6).width == 6
    # the non-batched pool keeps its lanes as the window
    assert DevicePool([counting_device(f"d{i}", []) for i in range(3)]).width == 3
    with pytest.raises(ValueError, match="window must be >= 1"):
        DevicePool([counting_device("gpu", [])], batched=True, window=0)


def test_batched_pool_with_window_one_is_sequential():
    calls: list[int] = []
    pool = DevicePool([counting_device("gpu", calls)], batched=True, window=1)
    sample_with(pool)
    assert max(calls) == 2


def test_device_gpus_of_the_layouts():
    assert device_gpus(RepositoryOptions(devices=3)) == [0, 1, 2]
    assert device_gpus(RepositoryOptions(devices=3, gpu_layout="batched")) == [0]
    assert device_gpus(RepositoryOptions(devices=3, gpu_layout="instances")) == [0, 0, 0]
    with pytest.raises(ValueError, match="gpu layout"):
        RepositoryOptions(gpu_layout="both").validate()


def test_auto_layout_is_batched_only_for_gpu_engines_on_one_gpu():
    def layout(backend: str, devices: int, gpus: int) -> str | None:
        options = RepositoryOptions(backend=backend, devices=devices, gpu_layout="auto")
        return resolve_gpu_layout(options, gpu_count=gpus).gpu_layout

    assert layout("torch", 4, 1) == "batched"
    assert layout("tensorrt", 2, 1) == "batched"
    assert layout("tensorrt", 2, 2) is None  # one device model per GPU
    assert layout("torch", 1, 1) is None
    assert layout("onnxruntime", 4, 0) is None
    assert layout("torch", 4, 0) is None  # no GPU: torch devices on the CPU, one per device
    explicit = RepositoryOptions(backend="torch", devices=4, gpu_layout="instances")
    assert resolve_gpu_layout(explicit, gpu_count=1).gpu_layout == "instances"


def test_batched_layout_writes_one_device_and_the_window(tmp_path: Path):
    from test_triton_repository import load_config, parameters, write_engines

    engines = write_engines(tmp_path / "tiny", "onnxruntime", key="cpu")
    repository = write_repository(tmp_path / "repo", RepositoryOptions(
        model=str(engines), devices=4, gpu_layout="batched"))
    assert [device.name for device in repository.devices] == ["unet_cpu0"]
    driffusion = parameters(load_config(repository.path / "driffusion"))
    assert driffusion["batched_rounds"] == "true" and driffusion["window"] == "4"

    plain = write_repository(tmp_path / "plain", RepositoryOptions(model=str(engines), devices=2))
    assert [device.name for device in plain.devices] == ["unet_cpu0", "unet_cpu1"]
    assert "batched_rounds" not in parameters(load_config(plain.path / "driffusion"))


def test_instances_layout_puts_every_tensorrt_device_on_gpu_zero(tmp_path: Path):
    from test_triton_repository import load_config, write_engines

    engines = write_engines(tmp_path / "tiny", "tensorrt", key="h100-sm90-00000000")
    repository = write_repository(tmp_path / "repo", RepositoryOptions(
        model=str(engines), devices=3, backend="tensorrt", gpu_layout="instances"))
    assert [device.name for device in repository.devices] == [f"unet_gpu{i}" for i in range(3)]
    for device in repository.devices:
        (group,) = load_config(repository.path / device.name).instance_group
        assert list(group.gpus) == [0]
