"""Train the bundled flow-matching reference model (`make train-reference-flow`).

Three stages, seeded, on scikit-learn's 8x8 digits (1,797 images, pixels scaled to [-1, 1]):
1. the VAE: the first reference's AutoencoderKL (models/assets/reference/vae), with SD3's
   `shift_factor` and `scaling_factor` set to the mean and 1 / std of the latents it encodes;
2. the two text encoders (small CLIPTextModelWithProjection) and the SD3 transformer together,
   by rectified flow as SD3 trains: x_t = (1 - s) x0 + s noise with s logit-normal, target
   noise - x0, timestep s x 1000; the prompts conditioned as diffusers' StableDiffusion3Pipeline
   encodes them (`encode_prompt`, the zero T5 tokens folded into one), each digit captioned by a
   random prompt template of the first reference, the empty prompt in `--null-prob` of the
   samples (for classifier-free guidance); AdamW, linear warm-up then cosine decay, EMA weights;
3. a check: digits that diffusers' StableDiffusion3Pipeline samples from the written folder
   (flow-matching Euler, 20 steps), recognised by the first reference's evaluation classifier.
Writes the diffusers folder (StableDiffusion3Pipeline without T5: model_index.json, tokenizer/,
tokenizer_2/, text_encoder/, text_encoder_2/, transformer/, vae/, scheduler/) and training.json
into models/assets/reference_flow/. The committed folder took 16 minutes with `--threads 1` on
the shared 2-core box (its training.json); with both threads of an otherwise idle box it is less,
but two threads on cores other jobs are busy with ran 3x slower than one.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from tqdm import tqdm
from transformers import CLIPTokenizer

from models import reference
from models.clip_tokenizer import write_clip_tokenizer
from models.reference import IMAGE_CHANNELS, MAX_TOKENS, real_digits
from models.reference_flow import (
    ASSET_DIR,
    PIPELINE_COMPONENTS,
    SCHEDULER_CONFIG,
    build_text_encoders,
    build_transformer,
    encode_prompts,
    fold_t5_tokens,
    load_pipeline,
    sd3_t5_tokens,
)
from models.train_reference import (
    caption_table,
    check_samples,
    check_training_args,
    mean_every,
    sample_captions,
    training_parser,
    weight_bytes,
    window_mean,
    write_training_record,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = training_parser(__doc__.splitlines()[0], batch_size=64, eval_per_class=10,
                             out=ASSET_DIR)
    parser.add_argument("--logit-mean", type=float, default=0.0,
                        help="mean of the logit-normal noise level distribution")
    parser.add_argument("--logit-std", type=float, default=1.0,
                        help="standard deviation of the logit-normal noise level distribution")
    args = parser.parse_args(argv)
    check_training_args(parser, args)
    if not args.logit_std > 0:
        parser.error("--logit-std must be > 0")
    return args


# ---------------------------------------------------------------------------------------------
# 1. the VAE


def standardised_vae(images: torch.Tensor):
    """The first reference's VAE with SD3's shift and scaling factors; its posterior means and
    standard deviations of `images`, and its stats."""
    vae = AutoencoderKL.from_pretrained(reference.ASSET_DIR / "vae", local_files_only=True)
    vae.eval().requires_grad_(False)
    rgb = images.expand(-1, IMAGE_CHANNELS, -1, -1)
    with torch.no_grad():
        posterior = vae.encode(rgb).latent_dist
    shift, std = posterior.mean.mean().item(), posterior.mean.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
    stats = {
        "source": "models/assets/reference/vae (the first reference's, not retrained)",
        "latent_mean": shift,
        "latent_std": std,
        "shift_factor": shift,
        "scaling_factor": 1.0 / std,
        "posterior_std_mean": posterior.std.mean().item(),
    }
    return vae, posterior.mean, posterior.std, stats


# ---------------------------------------------------------------------------------------------
# 2. the text encoders and the transformer


def new_pipeline(vae, tokenizer_dir: Path) -> StableDiffusion3Pipeline:
    """A StableDiffusion3Pipeline without T5 around fresh text encoders and transformer."""
    text_encoder, text_encoder_2 = build_text_encoders()
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    return StableDiffusion3Pipeline(
        transformer=build_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )


def noise_levels(batch: int, args: argparse.Namespace, generator: torch.Generator) -> torch.Tensor:
    """Logit-normal noise levels in (0, 1), as SD3 samples them."""
    logits = torch.randn(batch, generator=generator) * args.logit_std + args.logit_mean
    return torch.sigmoid(logits)


def train_flow(pipeline: StableDiffusion3Pipeline, latent_mean: torch.Tensor,
               latent_std: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace) -> dict:
    """Rectified flow on standardised latents, captions dropped to "" for CFG; EMA weights.

    Trains the pipeline's transformer and text encoders in place; returns the stats.
    """
    transformer = pipeline.transformer
    networks = (transformer, pipeline.text_encoder, pipeline.text_encoder_2)
    params = [p for network in networks for p in network.parameters()]
    fold_t5_tokens(transformer, sd3_t5_tokens())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, args.warmup, args.steps)
    ema = EMAModel(params, decay=args.ema_decay)
    prompts, per_digit = caption_table()
    empty = len(prompts) - 1
    shift = pipeline.vae.config.shift_factor
    scale = pipeline.vae.config.scaling_factor
    generator = torch.Generator().manual_seed(args.seed + 2)
    losses: list[float] = []
    for network in networks:
        network.train()
    progress = tqdm(range(args.steps), desc="flow", unit="step")
    for _ in progress:
        batch = torch.randint(len(labels), (args.batch_size,), generator=generator)
        noise_in_posterior = torch.randn(latent_mean[batch].shape, generator=generator)
        clean = (latent_mean[batch] + latent_std[batch] * noise_in_posterior - shift) * scale
        caption = sample_captions(labels[batch], per_digit, empty, args.null_prob, generator)
        # encode each distinct caption of the batch once
        distinct, row_of = torch.unique(caption, return_inverse=True)
        encoded = encode_prompts(pipeline, [prompts[i] for i in distinct], t5_tokens=1)
        conditioning = {name: value[row_of] for name, value in encoded.items()}
        noise = torch.randn(clean.shape, generator=generator)
        sigma = noise_levels(args.batch_size, args, generator).view(-1, 1, 1, 1)
        noisy = (1 - sigma) * clean + sigma * noise
        velocity = transformer(hidden_states=noisy, timestep=sigma.flatten() * 1000,
                               return_dict=False, **conditioning)[0]
        loss = F.mse_loss(velocity, noise - clean)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.step(params)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    ema.copy_to(params)
    for network in networks:
        network.eval().requires_grad_(False)
    return {
        "objective": "rectified flow: x_t = (1-s) x0 + s noise, target noise - x0, "
                     "timestep s x 1000, s = sigmoid(N(logit_mean, logit_std))",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup": args.warmup,
        "ema_decay": args.ema_decay,
        "null_prob": args.null_prob,
        "logit_mean": args.logit_mean,
        "logit_std": args.logit_std,
        "prompts": prompts,
        "initial_loss": window_mean(losses, start=True),
        "final_loss": window_mean(losses, start=False),
        "loss_every_100_steps": mean_every(losses),
    }


# ---------------------------------------------------------------------------------------------
# 3. writing the folder, and the check


def write_folder(out: Path, pipeline: StableDiffusion3Pipeline) -> None:
    """The diffusers folder, its tokenizer/ and tokenizer_2/ our CLIP tokenizer files."""
    out.mkdir(parents=True, exist_ok=True)
    for name in PIPELINE_COMPONENTS:
        if (out / name).exists():
            shutil.rmtree(out / name)
    pipeline.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(out / name)
        write_clip_tokenizer(out / name, model_max_length=MAX_TOKENS)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    images, labels = real_digits()
    timings = {}
    load_before = os.getloadavg()

    vae, latent_mean, latent_std, vae_stats = standardised_vae(images)
    print(f"vae shift {vae_stats['shift_factor']:.4f}, scaling {vae_stats['scaling_factor']:.4f}")

    work = tempfile.TemporaryDirectory(prefix="train-reference-flow-")
    tokenizer_dir = write_clip_tokenizer(Path(work.name) / "tokenizer",
                                         model_max_length=MAX_TOKENS)
    torch.manual_seed(args.seed + 2)
    pipeline = new_pipeline(vae, tokenizer_dir)
    started = time.perf_counter()
    flow_stats = train_flow(pipeline, latent_mean, latent_std, labels, args)
    timings["flow"] = time.perf_counter() - started
    print(f"flow loss {flow_stats['initial_loss']:.4f} -> {flow_stats['final_loss']:.4f} "
          f"({timings['flow'] / 60:.1f} min)")

    write_folder(args.out, pipeline)
    work.cleanup()
    started = time.perf_counter()
    classifier = reference.load_classifier()
    sample_accuracy = check_samples(args.out, classifier, args.eval_per_class, args.seed,
                                    load_pipeline=load_pipeline)
    timings["check"] = time.perf_counter() - started
    print(f"sampled digits recognised (flow-matching Euler, 20 steps): {sample_accuracy}")
    record = {
        "seed": args.seed,
        "threads": args.threads,
        "torch": torch.__version__,
        "parameters": {
            name: sum(p.numel() for p in getattr(pipeline, name).parameters())
            for name in ("text_encoder", "text_encoder_2", "transformer", "vae")
        },
        "weight_bytes": weight_bytes(args.out),
        "vae": vae_stats,
        "flow": flow_stats,
        "sample_accuracy_euler20": sample_accuracy,
        "eval_per_class": args.eval_per_class,
    }
    write_training_record(args.out, record, timings, load_before[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
