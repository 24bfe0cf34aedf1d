"""The bundled reference model: a small class-conditional SD-style UNet on 8x8 digits.

`--model reference` everywhere means this model. It has the parts of a Stable Diffusion
pipeline that matter for sampling (a `UNet2DConditionModel` with cross-attention, a "text
encoder" that here embeds a digit label, a DDPM epsilon schedule) at a size that trains and
runs on CPU. Sampling works directly in pixel space: there is no VAE.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from torch import nn

from models.pipeline_spec import CLASS_CONDITIONAL, PipelineSpec, digit_names

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "reference"
DIFFUSION_CHECKPOINT = "diffusion_ema.safetensors"
CLASSIFIER_CHECKPOINT = "classifier.safetensors"

NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES  # the "empty prompt" of classifier-free guidance
SAMPLE_SIZE = 8
IN_CHANNELS = 1
EMBED_DIM = 64
FEATURE_DIM = 128

UNET_CONFIG: dict[str, Any] = {
    "sample_size": SAMPLE_SIZE,
    "in_channels": IN_CHANNELS,
    "out_channels": IN_CHANNELS,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": EMBED_DIM,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

# clip_sample=False: DDIM inherits clip_sample from this config, and clipping x0 made
# guided samples worse with more steps in the feasibility run.
# timestep_spacing="leading" (first step t=950 at 20 steps): the cosine schedule leaves
# alphas_cumprod[999] near 2e-9, so schedulers that start at t=999 (the "linspace" default of
# Euler, DPM++ and UniPC) amplify the model's error there ~2e4-fold and some samples blow up.
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "timestep_spacing": "leading",
}




def check_labels(labels: torch.Tensor, *, allow_null: bool = True) -> None:
    """Raise ValueError unless `labels` is a 1-D integer tensor of digits (or the null label)."""
    highest = NULL_LABEL if allow_null else NUM_CLASSES - 1
    allowed = f"integers in 0..{NUM_CLASSES - 1}" + (
        f" or {NULL_LABEL} (the null label)" if allow_null else ""
    )
    is_tensor = isinstance(labels, torch.Tensor)
    if not is_tensor or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise ValueError(f"label must be an integer tensor of {allowed}; got {labels!r}")
    if labels.dim() != 1:
        raise ValueError(f"label must be 1-D [batch]; got shape {tuple(labels.shape)}")
    bad = labels[(labels < 0) | (labels > highest)]
    if bad.numel():
        raise ValueError(f"label must be {allowed}; got {bad.tolist()}")


class LabelEncoder(nn.Module):
    """The reference model's "text encoder": label int64 [B] -> encoder_hidden_states [B, 1, 64]."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(NUM_CLASSES + 1, EMBED_DIM)

    def forward(self, label: torch.Tensor) -> torch.Tensor:
        # Data-dependent checks cannot be traced; exported graphs validate at the server.
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            check_labels(label)
        return self.embedding(label).unsqueeze(1)


class DigitClassifier(nn.Module):
    """Small CNN used only for evaluation: class accuracy and Frechet distance on its features."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(IN_CHANNELS, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (SAMPLE_SIZE // 2) ** 2, FEATURE_DIM),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, 128] of images [B, 1, 8, 8] in [-1, 1]."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images)))


def build_unet() -> UNet2DConditionModel:
    """A freshly initialised reference UNet (about 1.0 M parameters)."""
    return UNet2DConditionModel(**UNET_CONFIG)


@dataclass
class ReferenceModel:
    """The loaded reference model: networks in eval mode plus the facts a pipeline needs."""

    unet: UNet2DConditionModel
    text_encoder: LabelEncoder
    classifier: DigitClassifier
    scheduler_config: dict[str, Any] = field(default_factory=lambda: dict(SCHEDULER_CONFIG))
    num_classes: int = NUM_CLASSES
    null_label: int = NULL_LABEL
    sample_size: int = SAMPLE_SIZE
    in_channels: int = IN_CHANNELS

    def initial_noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal latents [batch, 1, 8, 8]; scale by the scheduler's init_noise_sigma."""
        shape = (batch, self.in_channels, self.sample_size, self.sample_size)
        return torch.randn(shape, generator=generator)


def load_reference(
    device: str | torch.device = "cpu", asset_dir: Path = ASSET_DIR
) -> ReferenceModel:
    """Load the committed EMA weights of the reference model and its evaluation classifier."""
    paths = [asset_dir / DIFFUSION_CHECKPOINT, asset_dir / CLASSIFIER_CHECKPOINT]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"reference checkpoint missing: {', '.join(missing)}; run `make train-reference`"
        )
    diffusion = load_file(paths[0], device=str(device))
    unet, text_encoder, classifier = build_unet(), LabelEncoder(), DigitClassifier()
    unet.load_state_dict(_with_prefix(diffusion, "unet."))
    text_encoder.load_state_dict(_with_prefix(diffusion, "text_encoder."))
    classifier.load_state_dict(load_file(paths[1], device=str(device)))
    for network in (unet, text_encoder, classifier):
        network.to(device).eval().requires_grad_(False)
    return ReferenceModel(unet=unet, text_encoder=text_encoder, classifier=classifier)


def _with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def to_images(x: torch.Tensor) -> torch.Tensor:
    """Samples [B,1,H,W] or [B,H,W] in [-1, 1] -> uint8 pixels [B,H,W], out-of-range clipped."""
    if x.dim() == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"expected samples [B,1,H,W] or [B,H,W]; got shape {tuple(x.shape)}")
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits in the samples' range: images [1797,1,8,8] in [-1,1], labels [1797]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "real_digits needs scikit-learn: pip install 'driffusion-trt[bench]'"
        ) from error
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(8.0).sub(1.0).unsqueeze(1)
    return images, torch.from_numpy(digits.target).long()


def reference_spec() -> PipelineSpec:
    """The pipeline spec of the bundled reference model (pixel space, digit labels)."""
    return PipelineSpec(
        model="reference", family=CLASS_CONDITIONAL, latent_channels=IN_CHANNELS,
        latent_size=(SAMPLE_SIZE, SAMPLE_SIZE), scheduler_config=dict(SCHEDULER_CONFIG),
        num_labels=NUM_CLASSES, null_label=NULL_LABEL, label_names=digit_names(NUM_CLASSES),
        default_scheduler="ddim",
    )
