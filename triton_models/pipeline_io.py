"""Inputs and outputs of the `driffusion` pipeline model, and parsing its inputs into a request."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from runtime.pipeline import GenerationRequest, RequestError

# `driffusion` model inputs (each optional, shape [1]): name -> (Triton dtype, request field)
DRIFFUSION_INPUTS: dict[str, tuple[str, str]] = {
    "PROMPT": ("TYPE_STRING", "prompt"),
    "LABEL": ("TYPE_INT32", "label"),
    "NEGATIVE_PROMPT": ("TYPE_STRING", "negative_prompt"),
    "SEED": ("TYPE_INT64", "seed"),
    "STEPS": ("TYPE_INT32", "steps"),
    "MODE": ("TYPE_STRING", "mode"),
    "WINDOW": ("TYPE_INT32", "window"),
    "GUIDANCE": ("TYPE_FP32", "guidance"),
    "SCHEDULER": ("TYPE_STRING", "scheduler"),
    "TOLERANCE": ("TYPE_FP32", "tolerance"),
    "DRAFT_ORDER": ("TYPE_INT32", "draft_order"),
    "HEIGHT": ("TYPE_INT32", "height"),
    "WIDTH": ("TYPE_INT32", "width"),
    "TRUE_CFG": ("TYPE_FP32", "true_cfg"),
    "STRENGTH": ("TYPE_FP32", "strength"),
}
# a video model's further inputs (each optional, shape [1]), in its config only
VIDEO_INPUTS: dict[str, tuple[str, str]] = {
    "FRAMES": ("TYPE_INT32", "frames"),
    "GUIDANCE_2": ("TYPE_FP32", "guidance_2"),
}
# image inputs (optional): name -> (dims, request field); UINT8, RGB pixels and the repaint mask
DRIFFUSION_IMAGE_INPUTS: dict[str, tuple[list[int], str]] = {
    "INIT_IMAGE": ([-1, -1, 3], "init_image"),
    "MASK": ([-1, -1], "mask"),
}
# outputs: the image, and what DRiffusion did to make it
DRIFFUSION_OUTPUTS: dict[str, tuple[str, list[int]]] = {
    "IMAGE": ("TYPE_UINT8", [-1, -1, 3]),
    "ROUNDS": ("TYPE_INT32", [1]),
    "EVALUATIONS": ("TYPE_INT32", [1]),
}
# a video model answers VIDEO (uint8 [F, H, W, 3]) in IMAGE's place
VIDEO_OUTPUT = ("VIDEO", ("TYPE_UINT8", [-1, -1, -1, 3]))
IMAGE_OUTPUT = "IMAGE"
# the streaming model's (`driffusion_stream`) progress responses, one per round, hold these and
# ROUNDS (rounds so far); its last response holds the other outputs
STREAM_MODEL = "driffusion_stream"
PROGRESS_OUTPUTS: dict[str, tuple[str, list[int]]] = {
    "STEPS_DONE": ("TYPE_INT32", [1]),  # timesteps refined so far
    "STEPS_TOTAL": ("TYPE_INT32", [1]),  # timesteps the request refines in all
}


def driffusion_outputs(video: bool, stream: bool = False) -> dict[str, tuple[str, list[int]]]:
    """The `driffusion` model's outputs: an image model's, or a video model's (VIDEO first);
    the streaming model's add the progress outputs."""
    progress = PROGRESS_OUTPUTS if stream else {}
    if not video:
        return {**DRIFFUSION_OUTPUTS, **progress}
    rest = {name: entry for name, entry in DRIFFUSION_OUTPUTS.items() if name != IMAGE_OUTPUT}
    return dict([VIDEO_OUTPUT, *rest.items(), *progress.items()])


def driffusion_inputs(video: bool) -> dict[str, tuple[str, str]]:
    """The `driffusion` model's scalar inputs: a video model's add FRAMES and GUIDANCE_2."""
    return {**DRIFFUSION_INPUTS, **VIDEO_INPUTS} if video else dict(DRIFFUSION_INPUTS)


# string fields other than prompts are short names; their byte limit is fixed
MAX_NAME_BYTES = 64
# fields whose empty string means "not given" (the default), like an absent input
EMPTY_IS_DEFAULT = ("mode", "scheduler")


def check_image_shape(name: str, shape: Sequence[int], max_side: int) -> None:
    """RequestError unless an image input's shape fits its dims and `max_side` pixels a side;
    called on the shape alone, before the pixels are copied."""
    dims, field_name = DRIFFUSION_IMAGE_INPUTS[name]
    expected = "[H, W, 3]" if len(dims) == 3 else "[H, W]"
    if len(shape) != len(dims) or (len(dims) == 3 and shape[2] != 3):
        raise RequestError(field_name, f"must be UINT8 {expected}; got shape {list(shape)}")
    if not all(0 < side <= max_side for side in shape[:2]):
        raise RequestError(field_name, f"must be 1..{max_side} pixels a side "
                                       f"(--max-resolution); got {list(shape[:2])}")


def request_from_tensors(tensors: Mapping[str, np.ndarray | None],
                         max_prompt_bytes: int = 2048) -> GenerationRequest:
    """A GenerationRequest from the `driffusion` model's input tensors (absent ones are None).

    Each present scalar input must hold exactly one value; RequestError names the input
    otherwise. Strings are size-checked before they are decoded. An empty MODE or SCHEDULER
    means the default, as an absent one does; an empty PROMPT is a prompt (as in diffusers).
    Image inputs (shapes checked by `check_image_shape` before they were read) must be UINT8.
    """
    values: dict[str, object] = {}
    for name, (_, field_name) in DRIFFUSION_IMAGE_INPUTS.items():
        image = tensors.get(name)
        if image is not None:
            if image.dtype != np.uint8:
                raise RequestError(field_name, f"must be UINT8; got {image.dtype}")
            values[field_name] = image
    for name, (dtype, field_name) in {**DRIFFUSION_INPUTS, **VIDEO_INPUTS}.items():
        tensor = tensors.get(name)
        if tensor is None:
            continue
        if tensor.size != 1:
            raise RequestError(field_name, f"{name} must hold exactly one value; got shape "
                                           f"{list(tensor.shape)}")
        limit = max_prompt_bytes if field_name.endswith("prompt") else MAX_NAME_BYTES
        value = _scalar(tensor.reshape(-1)[0], dtype, field_name, limit)
        if not (value == "" and field_name in EMPTY_IS_DEFAULT):
            values[field_name] = value
    return GenerationRequest(**values)


def _scalar(value: object, dtype: str, field_name: str, limit: int) -> object:
    if dtype == "TYPE_STRING":
        raw = value if isinstance(value, bytes) else str(value).encode()
        if len(raw) > limit:
            raise RequestError(field_name, f"must be at most {limit} bytes; got {len(raw)}")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise RequestError(field_name, "must be UTF-8 text") from error
    if dtype == "TYPE_FP32":
        return float(value)
    return int(value)
