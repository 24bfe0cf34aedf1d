"""`driffusion demo`: its table, its grid image, its settings, and (slow) the whole run: every
digit asked for by prompt through the served reference model."""
from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
from PIL import Image

from bench.demo import (
    DemoImage,
    format_table,
    gray,
    grid_array,
    save_grid,
    settings_from_args,
    sigterm_as_interrupt,
    summarise,
)
from cli import build_parser
from cli import main as cli_main
from runtime.driffusion import round_pattern


def digit_image(value: int) -> np.ndarray:
    return np.full((8, 8), value, dtype=np.uint8)


def test_gray_is_the_rounded_channel_mean_of_the_rgb_image():
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[0, 0] = (255, 255, 255)
    rgb[0, 1] = (10, 11, 11)  # a VAE's channels differ slightly
    pixels = gray(rgb)
    assert pixels.shape == (8, 8) and pixels.dtype == np.uint8
    assert (pixels[0, 0], pixels[0, 1], pixels[1, 1]) == (255, 11, 0)


def test_grid_array_upscales_each_image_into_its_cell():
    first, second = digit_image(200), np.arange(64, dtype=np.uint8).reshape(8, 8)
    grid = grid_array([[first, second], [second, first]], scale=3, gap=2, background=7)
    assert grid.shape == (2 + 2 * (24 + 2), 2 + 2 * (24 + 2)) and grid.dtype == np.uint8
    assert (grid[2:26, 2:26] == 200).all()
    cell = grid[2:26, 28:52]
    assert (cell[::3, ::3] == second).all() and (cell[2::3, 2::3] == second).all()
    assert (grid[:2] == 7).all() and (grid[:, 26:28] == 7).all()


@pytest.mark.parametrize("rows, message", [
    ([], "equally many"),
    ([[digit_image(1)], [digit_image(1), digit_image(2)]], "equally many"),
    ([[digit_image(1), np.zeros((4, 4), np.uint8)]], r"image \(0, 1\) has shape"),
])
def test_grid_array_rejects_ragged_input(rows, message):
    with pytest.raises(ValueError, match=message):
        grid_array(rows)


def test_save_grid_writes_an_upscaled_labelled_png(tmp_path):
    rows = [[digit_image(40 * d) for d in range(3)] for _ in range(2)]
    save_grid(tmp_path / "grid.png", rows, ["sequential", "aggressive w2"], ["0", "1", "2"],
              "test", scale=16)
    with Image.open(tmp_path / "grid.png") as image:
        assert image.width >= 3 * 8 * 16 and image.height >= 2 * 8 * 16


def images_for(mode: str, window: int, seconds: float, rounds: int, offsets, predicted):
    return [DemoImage(mode, window, digit, digit, seconds, rounds,
                      digit_image(100 + offset), predicted=guess)
            for digit, (offset, guess) in enumerate(zip(offsets, predicted))]


def test_summarise_compares_every_mode_with_sequential():
    images = (images_for("sequential", 1, 0.5, 50, [0, 0, 0], [0, 1, 2])
              + images_for("aggressive", 2, 0.25, 26, [0, 3, -9], [0, 1, 7]))
    sequential, aggressive = summarise(images)
    assert (sequential.speedup, sequential.max_pixel_diff, sequential.accuracy) == (1.0, 0, 1.0)
    assert aggressive.speedup == pytest.approx(2.0)
    assert aggressive.ideal_speedup == pytest.approx(50 / 26)
    assert aggressive.latency_ms == pytest.approx(250.0)
    assert aggressive.max_pixel_diff == 9 and aggressive.mean_pixel_diff == pytest.approx(4.0)
    assert aggressive.accuracy == pytest.approx(2 / 3)
    table = format_table([sequential, aggressive]).splitlines()
    assert table[0].split()[:3] == ["mode", "window", "rounds"]
    assert table[3].split()[:6] == ["aggressive", "2", "26", "250.0", "2.00x", "1.92x"]
    assert "67%" in table[3] and "-33pt" in table[3] and "9/255" in table[3]


def test_summarise_needs_the_sequential_baseline():
    with pytest.raises(ValueError, match="sequential"):
        summarise(images_for("aggressive", 2, 0.25, 26, [0], [0]))


def test_sigterm_raises_keyboard_interrupt_inside_and_is_restored_after():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1.0)  # the handler interrupts the sleep
    assert signal.getsignal(signal.SIGTERM) == before


def demo_args(*argv: str):
    return build_parser("demo").parse_args(["demo", *argv])


def test_demo_settings_from_the_command_line():
    default = settings_from_args(demo_args())
    assert (default.steps, default.window, default.devices, default.repeat) == (50, 2, 2, 3)
    assert default.runs() == [("sequential", 1), ("conservative", 2), ("aggressive", 2)]
    assert settings_from_args(demo_args("--quick")).steps == 10
    assert settings_from_args(demo_args("--quick", "--steps", "7")).steps == 7
    assert settings_from_args(demo_args("--devices", "3")).window == 3
    with pytest.raises(ValueError, match="--guidance"):
        settings_from_args(demo_args("--guidance", "-1"))
    with pytest.raises(SystemExit):
        demo_args("--window", "0")


@pytest.mark.slow
@pytest.mark.triton
def test_quick_demo_end_to_end(tmp_path, capsys):
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    assert cli_main(["demo", "--quick", "--repeat", "1", "--out", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    assert "[5/5]" in output and "stopped" in output
    record = json.loads((tmp_path / "demo.json").read_text())
    summary = {row["mode"]: row for row in record["summary"]}
    assert list(summary) == ["sequential", "conservative", "aggressive"]
    for mode, row in summary.items():
        window = 1 if mode == "sequential" else 2
        assert row["rounds"] == len(round_pattern(mode, window, 10))
        assert row["accuracy"] >= 0.7
    assert summary["aggressive"]["max_pixel_diff"] > 0
    assert len(record["images"]) == 30
    assert [image["prompt"] for image in record["images"][:4]] == (
        ["a handwritten zero"] * 3 + ["a handwritten one"])
    assert np.array(record["images"][0]["pixels"]).shape == (8, 8)
    with Image.open(tmp_path / "grid.png") as image:
        assert image.width > 10 * 8 * 16
    leftovers = [pid for pid in os.listdir("/proc") if pid.isdigit()
                 and str(tmp_path) in _cmdline(pid)]
    assert leftovers == []


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().decode(errors="replace")
    except OSError:
        return ""
