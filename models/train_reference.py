"""Train the bundled reference model and its evaluation classifier (`make train-reference`).

Four stages, seeded, on scikit-learn's 8x8 digits (1,797 images, pixels scaled to [-1, 1]):
1. the evaluation classifier (a small CNN, stratified 80/20 split);
2. the VAE: a one-block AutoencoderKL (8x8 RGB <-> 8x8x1 latents) as an autoencoder with a
   small KL term; its `scaling_factor` is set to 1 / std of the latents it encodes;
3. the text encoder (a small CLIPTextModel) and the UNet together: epsilon prediction on the
   scaled VAE latents, each digit captioned by a random prompt template ("a handwritten
   seven", "the digit 7", "seven", ...), the empty prompt in place of the caption in
   `--null-prob` of the samples (for classifier-free guidance); AdamW, linear warm-up then
   cosine decay, EMA weights;
4. a check: sampled digits (DDIM, 20 steps) recognised by the classifier, per guidance scale.
Writes the diffusers folder (StableDiffusionPipeline: model_index.json, tokenizer/,
text_encoder/, unet/, vae/, scheduler/), classifier.safetensors and training.json into
models/assets/reference/. On 2 free CPU cores the default run takes about 10 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file
from sklearn.model_selection import train_test_split
from tqdm import tqdm
from transformers import CLIPTokenizer

from models.clip_tokenizer import write_clip_tokenizer
from models.reference import (
    ASSET_DIR,
    CLASSIFIER_CHECKPOINT,
    EMPTY_PROMPT,
    FOLDER_SCHEDULER_CONFIG,
    IMAGE_CHANNELS,
    MAX_TOKENS,
    NUM_CLASSES,
    PIPELINE_COMPONENTS,
    PROMPT_TEMPLATES,
    SCHEDULER_CONFIG,
    TRAINING_RECORD,
    DigitClassifier,
    build_text_encoder,
    build_unet,
    build_vae,
    real_digits,
    to_gray,
    training_prompts,
)


def training_parser(description: str, batch_size: int, eval_per_class: int,
                    out: Path) -> argparse.ArgumentParser:
    """The options both references' training scripts take (steps, batch, AdamW schedule, EMA,
    prompt dropout, the final check, seed, threads, output folder)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=2000, help="diffusion optimizer steps")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    parser.add_argument("--warmup", type=int, default=100,
                        help="linear warm-up steps before the cosine decay")
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--null-prob", type=float, default=0.1,
                        help="fraction of training captions replaced by the empty prompt (CFG)")
    parser.add_argument("--eval-per-class", type=int, default=eval_per_class,
                        help="samples per digit in the final check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=out, help="output folder")
    return parser


def check_training_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error unless the shared options are in range."""
    if min(args.steps, args.batch_size, args.threads, args.eval_per_class) < 1 or args.warmup < 0:
        parser.error("--steps, --batch-size, --threads and --eval-per-class must be >= 1 and "
                     "--warmup >= 0")
    if not 0.0 <= args.null_prob < 1.0 or not 0.0 < args.ema_decay < 1.0:
        parser.error("--null-prob must be in [0, 1) and --ema-decay in (0, 1)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = training_parser(__doc__.splitlines()[0], batch_size=128, eval_per_class=20,
                             out=ASSET_DIR)
    parser.add_argument("--vae-steps", type=int, default=600, help="VAE optimizer steps")
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-3,
                        help="weight of the VAE's KL term (per latent element)")
    parser.add_argument("--classifier-epochs", type=int, default=40)
    args = parser.parse_args(argv)
    check_training_args(parser, args)
    if args.vae_steps < 1:
        parser.error("--vae-steps must be >= 1")
    return args


def mean_every(values: list[float], every: int = 100) -> list[float]:
    return [round(sum(values[i:i + every]) / len(values[i:i + every]), 4)
            for i in range(0, len(values), every)]


def window_mean(values: list[float], start: bool) -> float:
    window = min(50, len(values))
    chunk = values[:window] if start else values[-window:]
    return sum(chunk) / window


# ---------------------------------------------------------------------------------------------
# 1. the evaluation classifier


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int
) -> tuple[DigitClassifier, float]:
    """Train on a stratified 80% split; return the classifier and its held-out accuracy."""
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.2, stratify=labels.numpy(), random_state=seed
    )
    torch.manual_seed(seed)
    classifier = DigitClassifier()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    train_idx = torch.from_numpy(train_idx)
    for _ in tqdm(range(epochs), desc="classifier", unit="epoch"):
        classifier.train()
        for batch in train_idx[torch.randperm(len(train_idx), generator=generator)].split(64):
            loss = F.cross_entropy(classifier(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    classifier.eval()
    with torch.no_grad():
        test_idx = torch.from_numpy(test_idx)
        predicted = classifier(images[test_idx]).argmax(dim=1)
    return classifier, (predicted == labels[test_idx]).float().mean().item()


# ---------------------------------------------------------------------------------------------
# 2. the VAE


def train_vae(images: torch.Tensor, args: argparse.Namespace):
    """The autoencoder (reconstruction MSE + KL), its scaling factor set; and its stats."""
    torch.manual_seed(args.seed + 1)
    vae = build_vae()
    rgb = images.expand(-1, IMAGE_CHANNELS, -1, -1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, 50, args.vae_steps)
    generator = torch.Generator().manual_seed(args.seed + 1)
    losses, recon_losses = [], []
    progress = tqdm(range(args.vae_steps), desc="vae", unit="step")
    vae.train()
    for _ in progress:
        batch = rgb[torch.randint(len(rgb), (args.batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(
            posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        recon = F.mse_loss(reconstruction, batch)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = recon + args.kl_weight * kl
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        recon_losses.append(recon.item())
        progress.set_postfix(mse=f"{sum(recon_losses[-50:]) / len(recon_losses[-50:]):.5f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        posterior = vae.encode(rgb).latent_dist
        std = posterior.mean.std().item()
        vae.register_to_config(scaling_factor=1.0 / std)
        decoded = vae.decode(posterior.mean).sample
    stats = {
        "steps": args.vae_steps,
        "lr": args.vae_lr,
        "kl_weight": args.kl_weight,
        "final_loss": window_mean(losses, start=False),
        "final_reconstruction_mse": window_mean(recon_losses, start=False),
        "reconstruction_mse_of_means": F.mse_loss(decoded, rgb).item(),
        "reconstruction_max_abs_error": (decoded - rgb).abs().max().item(),
        "latent_mean": posterior.mean.mean().item(),
        "latent_std": std,
        "posterior_std_mean": posterior.std.mean().item(),
        "scaling_factor": 1.0 / std,
        "loss_every_100_steps": mean_every(losses),
    }
    return vae, posterior.mean.detach(), posterior.std.detach(), stats


# ---------------------------------------------------------------------------------------------
# 3. the text encoder and the UNet


def caption_table() -> tuple[list[str], torch.Tensor]:
    """Every training prompt (the empty prompt last) and [10, T] the prompt indices of each
    digit."""
    prompts = [prompt for digit in range(NUM_CLASSES) for prompt in training_prompts(digit)]
    prompts.append(EMPTY_PROMPT)
    per_digit = torch.arange(NUM_CLASSES * len(PROMPT_TEMPLATES)).view(NUM_CLASSES, -1)
    return prompts, per_digit


def sample_captions(labels: torch.Tensor, per_digit: torch.Tensor, empty: int, null_prob: float,
                    generator: torch.Generator) -> torch.Tensor:
    """A random caption index per label (a random template), the empty prompt's index `empty`
    in place of it with probability `null_prob` (for classifier-free guidance)."""
    template = torch.randint(per_digit.shape[1], labels.shape, generator=generator)
    caption = per_digit[labels, template]
    caption[torch.rand(labels.shape, generator=generator) < null_prob] = empty
    return caption


def prompt_table(tokenizer) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Token ids [P, 77] of every training prompt (the empty prompt last), the prompts, and
    [10, T] the prompt indices of each digit."""
    prompts, per_digit = caption_table()
    ids = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    return ids, prompts, per_digit


def train_diffusion(latent_mean: torch.Tensor, latent_std: torch.Tensor, labels: torch.Tensor,
                    scaling_factor: float, tokenizer, args: argparse.Namespace):
    """Epsilon prediction on scaled latents, captions dropped to "" for CFG; EMA weights."""
    torch.manual_seed(args.seed + 2)
    unet, text_encoder = build_unet(), build_text_encoder()
    params = [*unet.parameters(), *text_encoder.parameters()]
    noise_schedule = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, args.warmup, args.steps)
    ema = EMAModel(params, decay=args.ema_decay)
    ids, prompts, per_digit = prompt_table(tokenizer)
    empty = len(prompts) - 1
    generator = torch.Generator().manual_seed(args.seed + 2)
    losses: list[float] = []
    unet.train()
    text_encoder.train()
    progress = tqdm(range(args.steps), desc="diffusion", unit="step")
    for _ in progress:
        batch = torch.randint(len(labels), (args.batch_size,), generator=generator)
        noise_in_posterior = torch.randn(latent_mean[batch].shape, generator=generator)
        clean = (latent_mean[batch] + latent_std[batch] * noise_in_posterior) * scaling_factor
        caption = sample_captions(labels[batch], per_digit, empty, args.null_prob, generator)
        # encode each distinct caption of the batch once
        distinct, row_of = torch.unique(caption, return_inverse=True)
        context = text_encoder(ids[distinct]).last_hidden_state[row_of]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(
            noise_schedule.config.num_train_timesteps, (args.batch_size,), generator=generator
        )
        noisy = noise_schedule.add_noise(clean, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, context).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.step(params)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    ema.copy_to(params)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    stats = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup": args.warmup,
        "ema_decay": args.ema_decay,
        "null_prob": args.null_prob,
        "prompts": prompts,
        "initial_loss": window_mean(losses, start=True),
        "final_loss": window_mean(losses, start=False),
        "loss_every_100_steps": mean_every(losses),
    }
    return unet, text_encoder, stats


# ---------------------------------------------------------------------------------------------
# 4. the check, and writing the folder


def check_samples(folder: Path, classifier: DigitClassifier, per_class: int, seed: int,
                  guidance_scales=(1.0, 2.0), steps: int = 20,
                  load_pipeline: Callable[[Path], Any] | None = None) -> dict[str, float]:
    """Classifier accuracy of digits that diffusers' own pipeline (`load_pipeline(folder)`,
    by default StableDiffusionPipeline) draws from the written folder for the first prompt
    template (its own scheduler, `steps`), per guidance scale."""
    from models import reference

    pipeline = (load_pipeline or reference.load_pipeline)(folder)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    prompts = [reference.prompt_for(int(digit)) for digit in labels]
    accuracy = {}
    for guidance in guidance_scales:
        with torch.no_grad():
            images = pipeline(prompts, num_inference_steps=steps, guidance_scale=guidance,
                              generator=torch.Generator().manual_seed(seed),
                              output_type="pt").images
            predicted = classifier(to_gray(images * 2 - 1).clamp(-1, 1)).argmax(dim=1)
        accuracy[f"guidance_{guidance:g}"] = (predicted == labels).float().mean().item()
    return accuracy


def write_folder(out: Path, unet, text_encoder, vae, classifier: DigitClassifier,
                 tokenizer_dir: Path) -> None:
    """The diffusers folder (its tokenizer/ our CLIP tokenizer files) and the classifier."""
    out.mkdir(parents=True, exist_ok=True)
    for name in PIPELINE_COMPONENTS:
        if (out / name).exists():
            shutil.rmtree(out / name)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True),
        unet=unet, scheduler=DDIMScheduler.from_config(FOLDER_SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(out / "tokenizer")
    write_clip_tokenizer(out / "tokenizer", model_max_length=MAX_TOKENS)
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()},
              out / CLASSIFIER_CHECKPOINT)


def write_training_record(out: Path, record: dict, timings: dict[str, float],
                          load_before: float) -> None:
    """`training.json` in `out`: the record with its wall times and the machine's load average
    (1 min) at the start and the end, since wall times on a shared machine depend on it."""
    record = {**record,
              "wall_seconds": {name: round(value, 1) for name, value in timings.items()},
              "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    (out / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} ({record['weight_bytes'] / 1e6:.2f} MB of weights, "
          f"{sum(timings.values()) / 60:.1f} min in all)")


def weight_bytes(out: Path) -> int:
    return sum(path.stat().st_size for path in out.rglob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    images, labels = real_digits()
    timings = {}
    load_before = os.getloadavg()

    started = time.perf_counter()
    classifier, accuracy = train_classifier(images, labels, args.classifier_epochs, args.seed)
    timings["classifier"] = time.perf_counter() - started
    print(f"classifier held-out accuracy: {accuracy:.4f} ({timings['classifier']:.0f} s)")

    started = time.perf_counter()
    vae, latent_mean, latent_std, vae_stats = train_vae(images, args)
    timings["vae"] = time.perf_counter() - started
    print(f"vae reconstruction MSE {vae_stats['reconstruction_mse_of_means']:.5f}, scaling "
          f"factor {vae_stats['scaling_factor']:.4f} ({timings['vae']:.0f} s)")

    work = tempfile.TemporaryDirectory(prefix="train-reference-")
    tokenizer_dir = write_clip_tokenizer(Path(work.name) / "tokenizer",
                                         model_max_length=MAX_TOKENS)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    started = time.perf_counter()
    unet, text_encoder, diffusion_stats = train_diffusion(
        latent_mean, latent_std, labels, vae_stats["scaling_factor"], tokenizer, args)
    timings["diffusion"] = time.perf_counter() - started
    print(f"diffusion loss {diffusion_stats['initial_loss']:.4f} -> "
          f"{diffusion_stats['final_loss']:.4f} ({timings['diffusion'] / 60:.1f} min)")

    write_folder(args.out, unet, text_encoder, vae, classifier, tokenizer_dir)
    work.cleanup()
    started = time.perf_counter()
    sample_accuracy = check_samples(args.out, classifier, args.eval_per_class, args.seed)
    timings["check"] = time.perf_counter() - started
    print(f"sampled digits recognised (DDIM 20 steps): {sample_accuracy}")
    record = {
        "seed": args.seed,
        "threads": args.threads,
        "torch": torch.__version__,
        "parameters": {
            "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
            "unet": sum(p.numel() for p in unet.parameters()),
            "vae": sum(p.numel() for p in vae.parameters()),
            "classifier": sum(p.numel() for p in classifier.parameters()),
        },
        "weight_bytes": weight_bytes(args.out),
        "classifier": {"epochs": args.classifier_epochs, "heldout_accuracy": accuracy},
        "vae": vae_stats,
        "diffusion": diffusion_stats,
        "sample_accuracy_ddim20": sample_accuracy,
    }
    write_training_record(args.out, record, timings, load_before[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
