"""`driffusion bench images`: image inputs on the reference model, sequential beside DRiffusion.

Real digits (scikit-learn's) go to the reference model's served engines (ONNX Runtime CPU
devices behind the embedded tritonserver, called over HTTP by the client-side pipeline):
- image-to-image: each digit d re-drawn as d+1 ("a handwritten four" from a real 3) at a high
  strength, so the model keeps the stroke style and changes the class;
- inpainting: the lower half of each digit repainted, asking for the same digit (the reference
  UNet takes 1 latent channel, so the plain-model path blends the kept upper half back after
  every step).
Each request runs sequentially and with aggressive DRiffusion at windows 2 and 4. The command
prints rounds, the classifier's accuracy and the pixel difference to sequential per run, and
writes image_inputs.png (rows: input and runs; columns: digits) and image_inputs.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.common import ensure_reference_engines, positive_int, sigterm_as_interrupt
from bench.demo import classify_pixels, gray, save_grid
from models import paths

DEFAULT_OUT = paths.output_dir("images")
WINDOWS = (1, 2, 4)  # 1: sequential
MASK_GRAY = 128  # how the repainted half of an input is drawn in the picture


@dataclass(frozen=True)
class ImageSettings:
    steps: int = 50
    img2img_strength: float = 0.9
    inpaint_strength: float = 1.0
    seed: int = 0
    devices: int = 2


@dataclass
class Run:
    """One task (img2img or inpaint) at one window, over every digit."""

    task: str
    window: int
    rounds: list[int] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list, repr=False)  # gray uint8 [8, 8]

    @property
    def label(self) -> str:
        """`img2img sequential`, `inpaint w4` (aggressive at window 4)."""
        return f"{self.task} {'sequential' if self.window == 1 else f'w{self.window}'}"


def real_digit_images() -> list[np.ndarray]:
    """The first real image of each digit 0..9, as uint8 RGB [8, 8, 3]."""
    from models.reference import real_digits

    images, labels = real_digits()
    first = [int((labels == digit).nonzero()[0]) for digit in range(10)]
    pixels = ((images[first, 0] + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    return [np.repeat(image[..., None], 3, axis=-1) for image in pixels]


def lower_half_mask(size: int = 8) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[size // 2:] = 255
    return mask


async def sample_all(endpoint: str, spec, settings: ImageSettings) -> list[Run]:
    """Every (task, window) over the ten digits through the served models at `endpoint`."""
    from models.reference import prompt_for
    from runtime.generate import connect_pipeline
    from runtime.pipeline import GenerationRequest
    from runtime.triton_clients import TritonEndpoints

    inputs, mask = real_digit_images(), lower_half_mask()
    runs = [Run(task, window) for task in ("img2img", "inpaint") for window in WINDOWS]
    async with TritonEndpoints([endpoint]) as connection:
        pipeline = await connect_pipeline(connection, spec=spec)
        for run in runs:
            for digit, image in enumerate(inputs):
                inpaint = run.task == "inpaint"
                request = GenerationRequest(
                    prompt=prompt_for(digit if inpaint else (digit + 1) % 10),
                    seed=settings.seed + digit, steps=settings.steps,
                    mode="sequential" if run.window == 1 else "aggressive",
                    window=run.window, guidance=1.0, init_image=image,
                    mask=mask if inpaint else None,
                    strength=settings.inpaint_strength if inpaint else settings.img2img_strength)
                result = await pipeline.generate(request)
                run.rounds.append(result.rounds)
                run.images.append(gray(result.image))
    return runs


def report(runs: list[Run]) -> list[dict]:
    """One row per run: rounds, accuracy against the asked digit, Δ pixels to sequential."""
    rows = []
    for run in runs:
        targets = [d if run.task == "inpaint" else (d + 1) % 10 for d in range(10)]
        predicted = classify_pixels(run.images)
        baseline = next(r for r in runs if r.task == run.task and r.window == 1)
        difference = np.abs(np.stack(run.images).astype(int) - np.stack(baseline.images))
        rows.append({"run": run.label, "rounds": int(np.median(run.rounds)),
                     "accuracy": float(np.mean([p == t for p, t in zip(predicted, targets)])),
                     "max_pixel_diff": int(difference.max()),
                     "mean_pixel_diff": float(difference.mean())})
    return rows


def write_picture(path: Path, runs: list[Run], settings: ImageSettings) -> None:
    inputs = [gray(image) for image in real_digit_images()]
    masked = [np.where(lower_half_mask() > 0, MASK_GRAY, image).astype(np.uint8)
              for image in inputs]
    rows, labels = [inputs], ["real digit"]
    for task, shown in (("img2img", None), ("inpaint", masked)):
        if shown is not None:
            rows.append(shown)
            labels.append("masked")
        for run in (r for r in runs if r.task == task):
            rows.append(run.images)
            labels.append(run.label)
    save_grid(path, rows, labels, [str(d) for d in range(10)],
              f"reference model, {settings.steps} DDIM steps; w2/w4: aggressive DRiffusion. "
              f"img2img asks for d+1 (strength {settings.img2img_strength:g}); inpainting "
              "repaints the lower half, asking for d")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "images",
        help="image inputs (img2img, inpainting) on the reference model, sequential beside "
        "DRiffusion, as a picture",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=positive_int, default=50, help="DDIM steps")
    parser.add_argument("--strength", type=float, default=0.9, help="img2img strength")
    parser.add_argument("--seed", type=int, default=0, help="seed of digit 0 (digit d: +d)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from triton_models.repository import RepositoryOptions
    from triton_models.serve import ServerError, serving

    settings = ImageSettings(steps=args.steps, img2img_strength=args.strength, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with sigterm_as_interrupt():
            ensure_reference_engines(lambda line: print(f"  {line}", flush=True))
            options = RepositoryOptions(model="reference", devices=settings.devices,
                                        pipeline_model=False)
            with serving(options, out / "repository", out / "tritonserver.log") as (server,
                                                                                   repository):
                runs = asyncio.run(sample_all(server.http_url, repository.spec, settings))
    except KeyboardInterrupt:
        print("\ninterrupted: Triton stopped", file=sys.stderr)
        return 130
    except (ServerError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    rows = report(runs)
    for row in rows:
        print(f"{row['run']:<26} rounds {row['rounds']:>3}  accuracy {row['accuracy']:.1f}  "
              f"max Δpx {row['max_pixel_diff']:>3}  mean Δpx {row['mean_pixel_diff']:.2f}")
    write_picture(out / "image_inputs.png", runs, settings)
    (out / "image_inputs.json").write_text(json.dumps(
        {"settings": settings.__dict__, "runs": rows}, indent=1) + "\n")
    print(f"wrote {out / 'image_inputs.png'} and {out / 'image_inputs.json'}")
    return 0
