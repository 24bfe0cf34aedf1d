"""Writing a video model's frames: an MP4 (H.264 through PyAV) or a folder of one PNG a frame.

`driffusion generate --out clip.mp4` writes the MP4, `--out frames/` (an existing folder, a name
ending in "/" or one without a suffix) the PNGs frame_0000.png, frame_0001.png, ...
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

VIDEO_SUFFIX = ".mp4"
# WanPipeline's examples export Wan's frames at 16 per second (diffusers' export_to_video)
FRAMES_PER_SECOND = 16
# x264 in a widely playable profile: 4:2:0 chroma (needs even sides), visually lossless quality
PIXEL_FORMAT = "yuv420p"
QUALITY = {"crf": "12"}


def check_video_out(out: Path) -> None:
    """ValueError unless `out` names an MP4 file or a folder for PNG frames (asked before the
    frames are sampled, so a long request does not end in a path it cannot write)."""
    if out.suffix.lower() == VIDEO_SUFFIX or is_frames_folder(out):
        return
    raise ValueError(f"this model makes video: --out must name an MP4 file (clip.mp4) or a "
                     f"folder for PNG frames (frames/); got {out}")


def is_frames_folder(out: Path) -> bool:
    return out.is_dir() or str(out).endswith(("/", "\\")) or out.suffix == ""


def save_video(frames: np.ndarray, out: Path, fps: int = FRAMES_PER_SECOND) -> list[Path]:
    """Write uint8 frames [F, H, W, 3] to `out` (see check_video_out); the files written."""
    check_video_out(out)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3]; got {frames.dtype} "
                         f"{list(frames.shape)}")
    if is_frames_folder(out):
        return write_pngs(frames, out)
    write_mp4(frames, out, fps)
    return [out]


def write_pngs(frames: np.ndarray, folder: Path) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"frame_{index:04d}.png" for index in range(len(frames))]
    for frame, path in zip(frames, paths):
        Image.fromarray(frame).save(path)
    return paths


def write_mp4(frames: np.ndarray, path: Path, fps: int = FRAMES_PER_SECOND) -> None:
    """H.264 in an MP4 container; the sides must be even (4:2:0 chroma)."""
    import av

    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"an MP4 (H.264, 4:2:0) needs even sides; the frames are "
                         f"{height}x{width}: write PNG frames to a folder instead")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps, options=QUALITY)
        stream.width, stream.height, stream.pix_fmt = width, height, PIXEL_FORMAT
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames


def read_mp4(path: Path) -> np.ndarray:
    """The decoded frames of an MP4 as uint8 [F, H, W, 3]."""
    import av

    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24")
                         for frame in container.decode(video=0)])
