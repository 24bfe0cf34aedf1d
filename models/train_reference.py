"""Train the bundled reference model and its evaluation classifier (`make train-reference`).

Writes EMA weights of the UNet and label encoder, the classifier, and a JSON of training
stats into models/assets/reference/ (the committed checkpoint). Seeded; on 2 CPU cores the
default run takes about 12 minutes when the cores are free.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from models.reference import (
    ASSET_DIR,
    CLASSIFIER_CHECKPOINT,
    DIFFUSION_CHECKPOINT,
    NULL_LABEL,
    SCHEDULER_CONFIG,
    DigitClassifier,
    LabelEncoder,
    build_unet,
    real_digits,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1600, help="diffusion optimizer steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    parser.add_argument("--warmup", type=int, default=100,
                        help="linear warm-up steps before the cosine decay")
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--null-prob", type=float, default=0.1,
                        help="fraction of training labels replaced by the null label (for CFG)")
    parser.add_argument("--classifier-epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=ASSET_DIR, help="checkpoint directory")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--steps, --batch-size and --threads must be >= 1 and --warmup >= 0")
    if not 0.0 <= args.null_prob < 1.0 or not 0.0 < args.ema_decay < 1.0:
        parser.error("--null-prob must be in [0, 1) and --ema-decay in (0, 1)")
    return args


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int
) -> tuple[DigitClassifier, float]:
    """Train on a stratified 80% split; return the classifier and its held-out accuracy."""
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.2, stratify=labels.numpy(), random_state=seed
    )
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


def train_diffusion(
    images: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Epsilon-prediction training with label dropout; return EMA weights and loss stats."""
    unet, encoder = build_unet(), LabelEncoder()
    params = [*unet.parameters(), *encoder.parameters()]
    noise_schedule = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, args.warmup, args.steps)
    ema = EMAModel(params, decay=args.ema_decay)
    generator = torch.Generator().manual_seed(args.seed)
    losses: list[float] = []
    progress = tqdm(range(args.steps), desc="diffusion", unit="step")
    for _ in progress:
        batch = torch.randint(len(labels), (args.batch_size,), generator=generator)
        clean, label = images[batch], labels[batch].clone()
        label[torch.rand(args.batch_size, generator=generator) < args.null_prob] = NULL_LABEL
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(
            noise_schedule.config.num_train_timesteps, (args.batch_size,), generator=generator
        )
        noisy = noise_schedule.add_noise(clean, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, encoder(label)).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.step(params)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    ema.copy_to(params)
    weights = {f"unet.{k}": v.contiguous() for k, v in unet.state_dict().items()}
    weights.update({f"text_encoder.{k}": v.contiguous() for k, v in encoder.state_dict().items()})
    window = min(50, len(losses))
    stats = {
        "initial_loss": sum(losses[:window]) / window,
        "final_loss": sum(losses[-window:]) / window,
        "loss_every_100_steps": [round(sum(losses[i:i + 100]) / len(losses[i:i + 100]), 4)
                                 for i in range(0, len(losses), 100)],
    }
    return weights, stats


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    images, labels = real_digits()

    started = time.perf_counter()
    classifier, accuracy = train_classifier(images, labels, args.classifier_epochs, args.seed)
    classifier_seconds = time.perf_counter() - started
    print(f"classifier held-out accuracy: {accuracy:.4f} ({classifier_seconds:.0f} s)")

    started = time.perf_counter()
    weights, loss_stats = train_diffusion(images, labels, args)
    diffusion_seconds = time.perf_counter() - started
    print(f"diffusion loss {loss_stats['initial_loss']:.4f} -> {loss_stats['final_loss']:.4f} "
          f"({diffusion_seconds / 60:.1f} min)")

    args.out.mkdir(parents=True, exist_ok=True)
    save_file(weights, args.out / DIFFUSION_CHECKPOINT)
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()},
              args.out / CLASSIFIER_CHECKPOINT)
    stats = {
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "torch": torch.__version__,
        **loss_stats,
        "diffusion_wall_seconds": round(diffusion_seconds, 1),
        "classifier_heldout_accuracy": accuracy,
        "classifier_wall_seconds": round(classifier_seconds, 1),
    }
    (args.out / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
