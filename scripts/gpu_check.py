"""Measure the GPU path in one run: environment, served UNet, DRiffusion via Triton, one-GPU
layouts, model sizes, TensorRT, on random-weight diffusers folders built by `engines.build`, served
by `triton_models.serve.serving` and timed over gRPC (`--dry-run`: tiny shapes on the CPU). A
failed section is recorded and the next runs; DIR/gpu_check.json (after each), DIR/gpu_check.md."""
import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import logging
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import positive_int
from engines.build import BACKEND_CHOICES, build_engines, choose_backend
from engines.build_types import BuildOutcome, BuildRequest
from export.onnx_export import ExportOptions

LOG = logging.getLogger("gpu_check")
SECTIONS = ("environment", "unet", "driffusion", "layouts", "sizes", "tensorrt")
PROMPT, SEED, GUIDANCE = "a photograph of an astronaut riding a horse", 42, 7.5
# SD 1.5's networks (runwayml/stable-diffusion-v1-5; omitted UNet fields: diffusers' defaults)
SD15 = {"unet": {"sample_size": 64, "in_channels": 4, "cross_attention_dim": 768,
                 "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                 "attention_head_dim": 8, "norm_num_groups": 32},
        "clip": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "hidden_act": "quick_gelu"},
        "vae": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
                "norm_num_groups": 32, "sample_size": 512}}
TINY = {"unet": {"sample_size": 8, "in_channels": 4, "cross_attention_dim": 32,
                 "block_out_channels": [32, 64], "layers_per_block": 1, "attention_head_dim": 8,
                 "norm_num_groups": 8, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]},
        "clip": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "hidden_act": "gelu"},
        "vae": {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1,
                "norm_num_groups": 8, "sample_size": 64}}
# SDXL base SCALED DOWN to build in the budget: 2 UNet blocks of 3, 1 transformer layer each (not
# 1, 2, 10), 64x64 latents (not 128), 8 of the 2nd encoder's 32 layers; SDXL's widths otherwise
XL_UNET = {**{key: TINY["unet"][key] for key in ("down_block_types", "up_block_types")},
           "use_linear_projection": True, "addition_embed_type": "text_time"}
SDXL = {**SD15, "unet": {**SD15["unet"], **XL_UNET, "cross_attention_dim": 768 + 1280,
                         "block_out_channels": [320, 640], "attention_head_dim": [5, 10],
                         "addition_time_embed_dim": 256,
                         "projection_class_embeddings_input_dim": 1280 + 6 * 256},
        "clip2": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 8,
                  "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280}}
TINY_XL = {**TINY, "unet": {**TINY["unet"], **XL_UNET, "cross_attention_dim": 32 + 48,
                            "addition_time_embed_dim": 8,
                            "projection_class_embeddings_input_dim": 24 + 6 * 8},
           "clip2": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "hidden_act": "gelu", "projection_dim": 24}}
SIZES = {"tiny": TINY, "sd15": SD15, "tiny-xl": TINY_XL, "sdxl": SDXL}
TINY_OF = {"sd15": "tiny", "sdxl": "tiny-xl"}  # --sizes, and the model each is in a dry run
SD15_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
# size: the served model's on GPU engines; repeats: timed calls after one warm-up call
Profile = collections.namedtuple("Profile", "size batches steps windows repeats min_s")
FULL = Profile("sd15", (1, 2, 4, 8, 16), 50, (2, 4, 8), 3,
               {"unet": 30, "driffusion": 30, "layouts": 30, "sizes": 40, "tensorrt": 120})
DRY = Profile("tiny", (1, 2, 4, 8), 8, (2, 4), 3, dict.fromkeys(SECTIONS[1:], 1))

def write_folder(path: Path, size: str) -> Path:
    """A random-weight StableDiffusion(XL)Pipeline folder of `size`, saved by diffusers itself."""
    import diffusers
    import transformers as tf

    from models.clip_tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, VOCAB_SIZE, write_clip_tokenizer
    config, blocks = SIZES[size], len(SIZES[size]["vae"]["block_out_channels"])
    ids = {"vocab_size": VOCAB_SIZE, "bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID,
           "pad_token_id": EOS_TOKEN_ID}
    torch.manual_seed(0)
    tokenizer = tf.CLIPTokenizer.from_pretrained(write_clip_tokenizer(path / "tokenizer"))
    parts = {"text_encoder": tf.CLIPTextModel(tf.CLIPTextConfig(**ids, **config["clip"])),
             "vae": diffusers.AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * blocks,
                                            up_block_types=["UpDecoderBlock2D"] * blocks,
                                            **config["vae"]),
             "unet": diffusers.UNet2DConditionModel(**config["unet"]), "tokenizer": tokenizer,
             "scheduler": diffusers.DDIMScheduler(**SD15_SCHEDULER)}
    if "clip2" in config:  # SDXL: a second encoder, with projection (its pooled text_embeds)
        encoder = tf.CLIPTextModelWithProjection(tf.CLIPTextConfig(**ids, **config["clip2"]))
        pipeline = diffusers.StableDiffusionXLPipeline(**parts, text_encoder_2=encoder,
                                                       tokenizer_2=tokenizer)
    else:
        pipeline = diffusers.StableDiffusionPipeline(**parts, **dict.fromkeys(
            ("safety_checker", "feature_extractor")), requires_safety_checker=False)
    pipeline.save_pretrained(path, safe_serialization=True)
    return path

@dataclass
class Check:
    """What every section gets: options, profile, budget, and the model served once for all."""
    args: argparse.Namespace
    profile: Profile
    work: Path
    stack: contextlib.ExitStack
    started: float = field(default_factory=time.monotonic)
    serving: dict = field(default_factory=dict)  # how the model is served: report["serving"]
    shared: dict = field(default_factory=dict)
    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started)
    def build(self, size: str, backend: str, precision: str = "fp32") -> BuildOutcome:
        """engines.build on the `size` folder (written once), for every call size of the run."""
        if size not in self.shared:
            self.shared[size] = write_folder(self.work / f"sd-{size}", size)
        folder, top = self.shared[size], max(*self.profile.batches, 2 * max(self.profile.windows))
        return build_engines(BuildRequest(
            source=str(folder), name=folder.name, engines_root=self.work / "engines",
            onnx_dir=self.work / "onnx" / f"{folder.name}-{precision}", backend=backend,
            precision=precision, export=ExportOptions(batch_range=(1, max(1, top // 2), top))),
            LOG.info)
    def served(self, outcome: BuildOutcome, name: str, **options: Any) -> Any:
        """A context serving `outcome`'s engines (one driffusion instance): (server, repository)."""
        from triton_models.repository import RepositoryOptions
        from triton_models.serve import serving
        options = RepositoryOptions(**{"devices": self.args.devices, "pipeline_instances": 1,
                                       "backend": outcome.backend, **options},
                                    model=str(outcome.directories[0].parent))
        return serving(options, self.work / name, self.args.out / f"{name}.log",
                       startup_timeout_s=max(30.0, self.left() - 10))
    def grpc_url(self) -> str:
        """The served profile model: started once, stopped when the run ends."""
        if "server" not in self.shared:
            backend, _, _, why = choose_backend(self.args.backend)
            size = "tiny" if backend == "onnxruntime" else self.profile.size  # CPU: tiny model
            started = time.perf_counter()
            outcome = self.build(size, self.args.backend)
            self.serving.update(size=size, backend=outcome.backend, engines=outcome.summary,
                                build_s=round(time.perf_counter() - started, 1), why=why)
            self.serving["note"] = ("the device models run ONNX Runtime on the CPU, not the GPU"
                                    if outcome.backend == "onnxruntime" else "on the GPU")
            self.shared["outcome"] = outcome
            self.shared["server"], repository = self.stack.enter_context(
                self.served(outcome, "tritonserver"))
            self.serving["models"] = repository.models
        return self.shared["server"].grpc_url

def section_environment(check: Check) -> dict:
    """Machine, GPUs, driver, torch, TensorRT and the tritonserver the run serves with."""
    from bench.common import machine_info
    from engines.gpu import list_gpus
    from engines.tensorrt_build import tensorrt_status
    from triton_models.serve import ServerError, pytriton_dir
    (gpus, no_gpu), (trt, no_trt) = list_gpus(), tensorrt_status()
    driver = Path("/proc/driver/nvidia/version")
    result = {**machine_info(), "torch_cuda": torch.version.cuda,
              "cuda_available": torch.cuda.is_available(), "gpus": [g.to_json() for g in gpus],
              "no_gpu_reason": no_gpu, "tensorrt": trt, "no_tensorrt_reason": no_trt,
              "driver": driver.read_text().splitlines()[0] if driver.is_file() else None}
    try:
        result["tritonserver"] = str(pytriton_dir() / "tritonserver" / "bin" / "tritonserver")
    except (ServerError, TypeError) as error:  # TypeError: a pytriton folder without __init__
        result["tritonserver_missing"] = f"{type(error).__name__}: {error}"
    return result

def section_unet(check: Check) -> dict:
    """UNet ms per batch, one warm-up call each: the first served `unet_*` model over gRPC."""
    from runtime.triton_clients import TritonEndpoints
    async def served() -> tuple[str, dict]:
        async with TritonEndpoints([check.grpc_url()]) as connection:
            device = (await connection.devices("unet_*"))[0]
            return device.name.split("/")[-1], await per_batch(check, device, check.serving["size"])
    model, batches = asyncio.run(served())
    check.shared["unet_ms"] = {int(b): e["median_ms"] for b, e in batches.items()}
    return {"model": model, "backend": check.serving["backend"], "batches": batches}

async def per_batch(check: Check, device: Any, size: str) -> dict:
    """Median, min and all ms of a runtime Device's calls at each batch, after one warm-up."""
    from models.tensors import ENCODER_HIDDEN_STATES
    config, batches, least = SIZES[size]["unet"], {}, check.profile.min_s["driffusion"]
    for batch in (batch for batch in check.profile.batches if check.left() >= least):
        side, rng, times = config["sample_size"], np.random.default_rng(batch), []
        inputs = (rng.standard_normal((batch, 4, side, side), np.float32),
                  np.full(batch, 500.0, np.float32), {ENCODER_HIDDEN_STATES: rng.standard_normal(
                      (batch, 77, config["cross_attention_dim"]), np.float32)})
        for _ in range(1 + check.profile.repeats):
            started = time.perf_counter()
            await device(*inputs)
            times.append(round((time.perf_counter() - started) * 1e3, 3))
        batches[str(batch)] = {"median_ms": float(np.median(times[1:])), "min_ms": min(times[1:]),
                               "all_ms": times[1:]}
    return batches

def section_driffusion(check: Check) -> dict:
    """Sequential vs aggressive at each window, GUIDANCE 1.0 and 7.5: median ms, speedup."""
    import tritonclient.grpc as grpcclient

    from runtime.driffusion import round_pattern
    client, sequential = grpcclient.InferenceServerClient(check.grpc_url()), {}
    result = {"backend": check.serving["backend"], "steps": check.profile.steps,
              "devices": check.args.devices, "runs": []}
    plan = [("sequential", 1)] + [("aggressive", window) for window in check.profile.windows]
    for guidance, (mode, window) in itertools.product((1.0, GUIDANCE), plan):
        if check.left() < 10:
            result["truncated"] = "budget"
            break
        trials = timed(check, client, mode, window, guidance)
        seconds, image, rounds, evaluations = sorted(trials, key=lambda t: t[0])[len(trials) // 2]
        base = sequential.setdefault(guidance, (seconds, image))  # each plan starts sequential
        pattern = round_pattern(mode, window, check.profile.steps)
        result["runs"].append(run := {
            "cfg": guidance > 1.0, "mode": mode, "window": window, "ms": round(seconds * 1e3, 2),
            "all_ms": [round(t[0] * 1e3, 2) for t in trials], "rounds": rounds,
            "evaluations": evaluations, "speedup": round(base[0] / seconds, 3),
            "max_pixel_diff_vs_sequential": int(np.abs(image - base[1]).max()),
            "max_pixel_diff_vs_plain_sequential": int(np.abs(image - sequential[1.0][1]).max()),
            "overhead_ms_per_round": overhead(check, guidance > 1.0, pattern, seconds * 1e3)})
        LOG.info("driffusion cfg=%s %s w%d: %.1f ms, %d rounds, speedup %.2f", run["cfg"], mode,
                 window, run["ms"], rounds, run["speedup"])
    client.close()
    return result

def timed(check: Check, client: Any, mode: str, window: int, guidance: float) -> list[tuple]:
    """Timed `driffusion` requests after a warm-up: (seconds, IMAGE, ROUNDS, EVALUATIONS)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import triton_to_np_dtype

    from triton_models.pipeline_io import DRIFFUSION_INPUTS
    inputs, values = [], {"PROMPT": PROMPT, "SEED": SEED, "STEPS": check.profile.steps,
                          "MODE": mode, "WINDOW": window, "GUIDANCE": guidance}
    for name, value in values.items():
        kind = DRIFFUSION_INPUTS[name][0].removeprefix("TYPE_").replace("STRING", "BYTES")
        inputs.append(grpcclient.InferInput(name, [1], kind))
        inputs[-1].set_data_from_numpy(np.array([value], dtype=triton_to_np_dtype(kind)))
    def once() -> tuple:
        started = time.perf_counter()
        answer = client.infer("driffusion", inputs, client_timeout=600)
        return (time.perf_counter() - started, answer.as_numpy("IMAGE").astype(int),
                int(answer.as_numpy("ROUNDS")[0]), int(answer.as_numpy("EVALUATIONS")[0]))
    return [once() for _ in range(1 + check.profile.repeats)][1:]

def overhead(check: Check, cfg: bool, pattern: list[int], ms: float) -> float | None:
    """(latency - the unet section's UNet ms, interpolated, of every round's call) / rounds."""
    if not (measured := check.shared.get("unet_ms")):
        return None
    rows = [-(-items // check.args.devices) * (2 if cfg else 1) for items in pattern]
    unet_ms = np.interp(rows, sorted(measured), [measured[b] for b in sorted(measured)]).sum()
    return round((ms - float(unet_ms)) / len(pattern), 3)

def versus(check: Check, url: str) -> dict:
    """Median ms of sequential and aggressive window 4 `driffusion` requests with CFG."""
    import tritonclient.grpc as grpcclient
    client, ms = grpcclient.InferenceServerClient(url), {}
    for key, window in (("sequential_ms", 1), ("aggressive_w4_ms", 4)):
        trials = timed(check, client, key.split("_")[0], window, GUIDANCE)
        ms[key] = round(float(np.median([trial[0] for trial in trials])) * 1e3, 2)
    client.close()
    return {**ms, "speedup": round(ms["sequential_ms"] / ms["aggressive_w4_ms"], 3)}

def section_layouts(check: Check) -> dict:
    """`versus` on the served engines in each one-GPU layout of 4 devices (GPU engines only)."""
    from triton_models.repository import GPU_LAYOUTS
    check.grpc_url()
    if (backend := check.serving["backend"]) == "onnxruntime" and not check.args.dry_run:
        return {"skipped": f"{backend} engines run on the CPU: no one-GPU layout to compare"}
    result: dict[str, Any] = {"backend": backend, "devices": 4, "layouts": {}}
    for layout in GPU_LAYOUTS:
        with check.served(check.shared["outcome"], f"tritonserver-{layout}", devices=4,
                          gpu_layout=layout) as (server, repository):
            result["layouts"][layout] = {"models": repository.models,
                                         **versus(check, server.grpc_url)}
    fastest = min(result["layouts"].items(), key=lambda item: item[1]["aggressive_w4_ms"])[0]
    return {**result, "fastest": fastest}

def section_sizes(check: Check) -> dict:
    """`versus` on each --sizes model (tiny ones on CPU engines); a failed size is recorded."""
    check.grpc_url()
    backend, tiny, result = check.serving["backend"], check.serving["size"] == "tiny", {}
    for size, started in ((size, time.perf_counter()) for size in check.args.sizes):
        model = TINY_OF[size] if tiny or check.args.dry_run else size
        try:
            with contextlib.ExitStack() as stack:
                url = check.grpc_url() if model == check.serving["size"] else stack.enter_context(
                    check.served(check.build(model, backend), f"tritonserver-{model}"))[0].grpc_url
                result[size] = {"model": model, "scaled_down": model == "sdxl",
                                **versus(check, url)}
        except Exception as error:  # noqa: BLE001 - one size failing must not hide the others
            result[size] = {"model": model, "error": f"{type(error).__name__}: {error}"}
        result[size]["seconds"] = round(time.perf_counter() - started, 1)
    return {"backend": backend, "steps": check.profile.steps, "sizes": result}

def section_tensorrt(check: Check) -> dict:
    """TensorRT plans of the profile's folder where TensorRT and a GPU exist, else why not."""
    from engines.manifest import read_manifest
    backend, gpus, trt_version, why = choose_backend("auto")
    result: dict[str, Any] = {"present": trt_version is not None, "version": trt_version,
                              "gpus": [gpu.to_json() for gpu in gpus]}
    if backend != "tensorrt":
        return {**result, "skipped": f"no TensorRT plans here: {why}"}
    outcome = check.build(check.profile.size, "tensorrt", "fp16")
    networks = (read_manifest(outcome.directories[0]) or {}).get("networks", {})
    result.update(built=outcome.built, kept=outcome.kept, summary=outcome.summary,
                  build_s={name: entry.get("build_seconds") for name, entry in networks.items()},
                  used=check.serving.get("backend") == "tensorrt")
    return result

SECTION_FUNCTIONS: dict[str, Callable[[Check], dict]] = {
    name: globals()[f"section_{name}"] for name in SECTIONS}

def run_section(name: str, check: Check) -> dict:
    """One section's record: status ok / skipped / error, seconds, and its result."""
    started, minimum = time.perf_counter(), check.profile.min_s.get(name, 0)
    LOG.info("== %s (%.0f s of budget left)", name, check.left())
    try:
        result = {"skipped": f"budget: {check.left():.0f} s left, the section needs {minimum} s"}
        result = result if check.left() < minimum else SECTION_FUNCTIONS[name](check)
        record = {"status": "skipped" if "skipped" in result else "ok", "result": result,
                  "reason": result.pop("skipped", None)}
    except Exception as error:  # noqa: BLE001 - a failed section must not stop the others
        record = {"status": "error", "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc(limit=8)}
        LOG.error("%s failed: %s", name, record["error"])
    return {**record, "seconds": round(time.perf_counter() - started, 2)}

def table(columns: list[str], rows: list[list]) -> list[str]:
    lines = [f"| {' | '.join(map(str, row))} |" for row in [columns, ["-"] * len(columns), *rows]]
    return lines + [""] if rows else []

def markdown(report: dict) -> str:
    """The headline numbers as Markdown tables, ready for docs/BENCHMARKS.md."""
    results = {name: record.get("result", {}) for name, record in report["sections"].items()}
    env, unet, serving = results.get("environment", {}), results.get("unet", {}), report["serving"]
    gpu, note = (env.get("gpus") or [{"name": "none"}])[0]["name"], serving.get("note", "none")
    header = (f"GPU {gpu}, torch {env.get('torch')}, TensorRT {env.get('tensorrt')}; served "
              f"{serving.get('size')} model, {serving.get('backend')} engines ({note})")
    lines = [header, ""] + table(["batch", f"{unet.get('model')} ms"], [
        [b, e["median_ms"]] for b, e in unet.get("batches", {}).items()])
    columns = ["cfg", "mode", "window", "ms", "rounds", "speedup", "overhead_ms_per_round"]
    lines += table(columns, [[run[key] for key in columns]
                             for run in results.get("driffusion", {}).get("runs", [])])
    columns = ["sequential_ms", "aggressive_w4_ms", "speedup"]
    for key, name in (("layouts", "layout"), ("sizes", "size")):
        lines += table([name, "model", *columns], [
            [item, entry.get("model", "4 devices"), *(entry.get(c) for c in columns)]
            for item, entry in results.get(key, {}).get(key, {}).items()])
    return "\n".join(lines + [f"{name}: {r['status']} {r.get('reason') or r.get('error') or ''}"
                              .rstrip() for name, r in report["sections"].items()]) + "\n"

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="On the GPU "
                                     "machine use scripts/gpu_run.sh; without a GPU use --dry-run.")
    parser.add_argument("--out", type=Path, required=True, help="folder of the results")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--budget-s", type=positive_int, default=240,
                        help="time budget; sections that no longer fit are skipped (default 240)")
    parser.add_argument("--sections", type=lambda text: text.split(","), default=SECTIONS,
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                        help="engines served (default auto: TensorRT plans where it imports, "
                        "else torch on a GPU)")
    parser.add_argument("--devices", type=positive_int, default=1, help="unet_* models (1)")
    parser.add_argument("--sizes", type=lambda text: text.split(","), default=["sd15"],
                        help=f"models the sizes section times, of {','.join(TINY_OF)} (sd15)")
    args = parser.parse_args(argv)
    for kind, given, known in (("section", args.sections, SECTIONS), ("size", args.sizes, TINY_OF)):
        if unknown := set(given) - set(known):
            parser.error(f"unknown {kind}(s) {', '.join(sorted(unknown))}; choose from {[*known]}")
    return args

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU found (torch {torch.__version__}). Add --dry-run for the "
              "CPU rehearsal, or run scripts/gpu_run.sh on a GPU machine.", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    handlers = [logging.StreamHandler(), logging.FileHandler(args.out / "gpu_check.log", "w")]
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%X"))
    LOG.handlers, LOG.propagate, LOG.level = handlers, False, logging.INFO
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work, contextlib.ExitStack() as stack:
        return run_all(Check(args, DRY if args.dry_run else FULL, Path(work), stack))

def run_all(check: Check) -> int:
    """Run the requested sections, rewriting the JSON after each; 1 if any section failed."""
    args, path = check.args, check.args.out / "gpu_check.json"
    report: dict[str, Any] = {"schema": 2, "started": time.strftime("%FT%T%z"), "dry_run":
                              args.dry_run, "budget_s": args.budget_s, "sections": {},
                              "profile": check.profile._asdict(), "serving": check.serving}
    for name in args.sections:
        report["sections"][name] = run_section(name, check)
        report["elapsed_s"] = round(time.monotonic() - check.started, 1)
        path.with_suffix(".partial").write_text(json.dumps(report, indent=2, default=str))
        path.with_suffix(".partial").replace(path)
    (args.out / "gpu_check.md").write_text(summary := markdown(report))
    LOG.info("summary:\n%s", summary)
    return 1 if any(r["status"] == "error" for r in report["sections"].values()) else 0

if __name__ == "__main__":
    sys.exit(main())
