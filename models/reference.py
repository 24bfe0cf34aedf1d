"""The bundled reference model: a small Stable Diffusion text-to-image pipeline of 8x8 digits.

`--model reference` everywhere means this model. `models/assets/reference/` is an ordinary
diffusers folder (`model_index.json`, StableDiffusionPipeline): the real CLIP BPE tokenizer, a
small `CLIPTextModel` (16 wide) and a `UNet2DConditionModel` trained jointly on prompts such as
"a handwritten seven", a one-block `AutoencoderKL` (VAE scale factor 1: 8x8 latents of one
channel decode to 8x8 RGB images, the gray digit in all three channels) and a DDIM scheduler.
`StableDiffusionPipeline.from_pretrained(ASSET_DIR)` runs it offline; it is served like any
other diffusers folder. The folder also holds `classifier.safetensors`, a small CNN used only
for evaluation (class accuracy and digits-FD), and `training.json`, the training record.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from models import tensors
from models.clip_tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, VOCAB_SIZE

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "reference"
MODEL_INDEX = "model_index.json"
CLASSIFIER_CHECKPOINT = "classifier.safetensors"
TRAINING_RECORD = "training.json"
# what the served pipeline is made of (the classifier and the training record are not part of it)
PIPELINE_COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "unet", "vae")

NUM_CLASSES = 10
SAMPLE_SIZE = 8  # image side in pixels, and latent side (VAE scale factor 1)
LATENT_CHANNELS = 1
IMAGE_CHANNELS = 3  # RGB, the gray digit in every channel
TEXT_HIDDEN = 16
MAX_TOKENS = 77
FEATURE_DIM = 128
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# training prompts per digit; the first is the one the apps ask with
PROMPT_TEMPLATES = (
    "a handwritten {word}",
    "the digit {digit}",
    "{word}",
    "number {digit}",
    "a handwritten digit {digit}",
    "the number {word}",
    "{digit}",
    "a drawing of the digit {word}",
)
EMPTY_PROMPT = ""  # the negative of classifier-free guidance

TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": TEXT_HIDDEN,
    "intermediate_size": 4 * TEXT_HIDDEN,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": MAX_TOKENS,
    "projection_dim": TEXT_HIDDEN,
    "hidden_act": "quick_gelu",
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "pad_token_id": EOS_TOKEN_ID,
}

UNET_CONFIG: dict[str, Any] = {
    "sample_size": SAMPLE_SIZE,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": TEXT_HIDDEN,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

# one block: no down/upsampling, so the VAE scale factor is 1 and latents are 8x8
VAE_CONFIG: dict[str, Any] = {
    "in_channels": IMAGE_CHANNELS,
    "out_channels": IMAGE_CHANNELS,
    "latent_channels": LATENT_CHANNELS,
    "block_out_channels": (32,),
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": SAMPLE_SIZE,
}

# clip_sample=False: DDIM inherits clip_sample from this config, and clipping x0 made
# guided samples worse with more steps in the feasibility run.
# timestep_spacing="leading" (first step t=950 at 20 steps): the cosine schedule leaves
# alphas_cumprod[999] near 2e-9, so schedulers that start at t=999 (the "linspace" default of
# Euler, DPM++ and UniPC) amplify the model's error there ~2e4-fold and some samples blow up.
# The closed-form sim (models/sim.py) shares this schedule.
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "timestep_spacing": "leading",
}
# the folder's scheduler: diffusers' StableDiffusionPipeline rewrites any steps_offset but 1 on
# load (with a deprecation warning), so the folder carries 1 (first step t=951 at 20 steps)
FOLDER_SCHEDULER_CONFIG: dict[str, Any] = {**SCHEDULER_CONFIG, "steps_offset": 1}


def prompt_for(digit: int, template: str = PROMPT_TEMPLATES[0]) -> str:
    """The prompt that asks for `digit`, e.g. prompt_for(7) == "a handwritten seven"."""
    if not 0 <= int(digit) < NUM_CLASSES:
        raise ValueError(f"digit must be in 0..{NUM_CLASSES - 1}; got {digit}")
    return template.format(word=DIGIT_WORDS[digit], digit=digit)


def training_prompts(digit: int) -> list[str]:
    """Every training prompt of `digit` (one per template)."""
    return [prompt_for(digit, template) for template in PROMPT_TEMPLATES]


class DigitClassifier(nn.Module):
    """Small CNN used only for evaluation: class accuracy and Frechet distance on its features."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
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
        """Penultimate features [B, 128] of gray images [B, 1, 8, 8] in [-1, 1]."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images)))


def build_text_encoder():
    """A freshly initialised reference text encoder (CLIPTextModel, about 0.8 M parameters,
    nearly all of them the 49,408 x 16 token embedding)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))


def build_unet():
    """A freshly initialised reference UNet (about 1.0 M parameters)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def build_vae():
    """A freshly initialised reference VAE (one block, about 0.14 M parameters)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


@dataclass
class ReferenceModel:
    """The loaded reference pipeline's networks in eval mode, and the evaluation classifier."""

    tokenizer: Any  # transformers CLIPTokenizer
    text_encoder: nn.Module  # CLIPTextModel
    unet: nn.Module  # UNet2DConditionModel
    vae: nn.Module  # AutoencoderKL
    classifier: DigitClassifier
    scheduler_config: dict[str, Any] = field(default_factory=lambda: dict(FOLDER_SCHEDULER_CONFIG))
    preset: ClassVar[str] = "reference"
    denoiser_network: ClassVar[str] = "unet"  # the engine that runs the denoiser

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def sample_size(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP token ids [N, 77] of prompts, padded and truncated as diffusers does."""
        return self.tokenizer(list(prompts), padding="max_length",
                              max_length=self.tokenizer.model_max_length, truncation=True,
                              return_tensors="pt").input_ids

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """The UNet's encoder_hidden_states [N, 77, 16]: the text encoder's last hidden state."""
        return self.text_encoder(self.tokenize(prompts)).last_hidden_state

    def initial_noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal latents [batch, 1, 8, 8]; scale by the scheduler's init_noise_sigma."""
        shape = (batch, self.latent_channels, self.sample_size, self.sample_size)
        return torch.randn(shape, generator=generator)

    def denoiser_inputs(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The UNet's conditioning inputs for prompts, by tensor name."""
        return {tensors.ENCODER_HIDDEN_STATES: self.encode_prompts(prompts)}

    @torch.no_grad()
    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor,
                **conditioning: torch.Tensor) -> torch.Tensor:
        """The UNet's noise prediction for latents `sample` at `timestep`."""
        return self.unet(sample, timestep, **conditioning).sample

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """RGB images [N, 3, 8, 8] in [-1, 1] (unclipped) of latents [N, 1, 8, 8]."""
        return self.vae.decode(latents / self.scaling_factor).sample

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents [N, 1, 8, 8] (posterior means) of gray [N,1,8,8] or RGB images."""
        if images.shape[1] == 1:
            images = images.expand(-1, IMAGE_CHANNELS, -1, -1)
        return self.vae.encode(images).latent_dist.mean * self.scaling_factor


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """Gray images [N, 1, H, W] of RGB [N, 3, H, W] (the channel mean); gray passes as is."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N,1,H,W] or [N,3,H,W]; got {tuple(images.shape)}")
    return images if images.shape[1] == 1 else images.mean(dim=1, keepdim=True)


def load_reference(device: str | torch.device = "cpu", asset_dir: Path = ASSET_DIR
                   ) -> ReferenceModel:
    """Load the committed reference pipeline's networks and the evaluation classifier."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    check_assets(asset_dir)
    tokenizer = CLIPTokenizer.from_pretrained(asset_dir / "tokenizer", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(asset_dir / "text_encoder",
                                                 local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(asset_dir / "unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(asset_dir / "vae", local_files_only=True)
    classifier = load_classifier(device, asset_dir)
    for network in (text_encoder, unet, vae):
        network.to(device).eval().requires_grad_(False)
    scheduler = json.loads((asset_dir / "scheduler" / "scheduler_config.json").read_text())
    return ReferenceModel(tokenizer, text_encoder, unet, vae, classifier, scheduler)


def load_classifier(device: str | torch.device = "cpu", asset_dir: Path = ASSET_DIR
                    ) -> DigitClassifier:
    """The evaluation classifier alone, in eval mode."""
    from safetensors.torch import load_file

    path = asset_dir / CLASSIFIER_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `make train-reference`")
    classifier = DigitClassifier()
    classifier.load_state_dict(load_file(path, device=str(device)))
    return classifier.to(device).eval().requires_grad_(False)


def load_pipeline(asset_dir: Path = ASSET_DIR):
    """diffusers' StableDiffusionPipeline of the reference folder, offline, fp32 on the CPU."""
    from diffusers import StableDiffusionPipeline

    check_assets(asset_dir)
    pipeline = StableDiffusionPipeline.from_pretrained(asset_dir, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def check_assets(asset_dir: Path = ASSET_DIR) -> None:
    """FileNotFoundError unless `asset_dir` holds the pipeline folder and the classifier."""
    needed = [asset_dir / MODEL_INDEX, asset_dir / CLASSIFIER_CHECKPOINT,
              *(asset_dir / name for name in PIPELINE_COMPONENTS)]
    missing = [str(path) for path in needed if not path.exists()]
    if missing:
        raise FileNotFoundError(
            f"reference model incomplete, missing: {', '.join(missing)}; run "
            "`make train-reference`")


def pipeline_files(asset_dir: Path = ASSET_DIR,
                   components: Sequence[str] = PIPELINE_COMPONENTS) -> list[Path]:
    """Every file of the diffusers pipeline folder (not the classifier or training record)."""
    files = [asset_dir / MODEL_INDEX]
    for name in components:
        files += sorted(path for path in (asset_dir / name).rglob("*") if path.is_file())
    return files


def to_images(x: torch.Tensor) -> torch.Tensor:
    """Images [B,1,H,W], [B,3,H,W] (gray: channel mean) or [B,H,W] in [-1, 1] -> uint8 pixels
    [B,H,W], out-of-range clipped."""
    if x.dim() == 4:
        x = to_gray(x)[:, 0]
    if x.dim() != 3:
        raise ValueError(f"expected images [B,C,H,W] or [B,H,W]; got shape {tuple(x.shape)}")
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
