"""Ask `driffusion_stream` over a gRPC stream: print a line per round as the request runs, then
save its video (MP4, or a folder of PNGs) or image (PNG).

    python scripts/stream_progress.py --url localhost:8001 --prompt "a fox in the snow" \
        --steps 30 --frames 33 --out fox.mp4

Each progress response holds STEPS_DONE, STEPS_TOTAL and ROUNDS (so far); the last one holds
VIDEO (or IMAGE), ROUNDS and EVALUATIONS, and carries Triton's final-response flag. An error
response (a bad field, a busy server) is printed and the script stops; Ctrl-C cancels the
request on the server.
"""
from __future__ import annotations

import argparse
import queue
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpc_client

MODEL = "driffusion_stream"
# flag -> (input name, Triton datatype, numpy dtype); only the flags given are sent
FIELDS = {
    "prompt": ("PROMPT", "BYTES", np.object_),
    "negative_prompt": ("NEGATIVE_PROMPT", "BYTES", np.object_),
    "seed": ("SEED", "INT64", np.int64),
    "steps": ("STEPS", "INT32", np.int32),
    "mode": ("MODE", "BYTES", np.object_),
    "window": ("WINDOW", "INT32", np.int32),
    "guidance": ("GUIDANCE", "FP32", np.float32),
    "guidance_2": ("GUIDANCE_2", "FP32", np.float32),
    "height": ("HEIGHT", "INT32", np.int32),
    "width": ("WIDTH", "INT32", np.int32),
    "frames": ("FRAMES", "INT32", np.int32),
}
PARSERS = {"BYTES": str, "INT64": int, "INT32": int, "FP32": float}


def request_inputs(values: dict[str, object]) -> list[grpc_client.InferInput]:
    """The request's inputs: each given field as a one-element tensor."""
    inputs = []
    for field, value in values.items():
        name, datatype, dtype = FIELDS[field]
        tensor = grpc_client.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(np.array([value.encode() if isinstance(value, str) else value],
                                            dtype=dtype))
        inputs.append(tensor)
    return inputs


def stream(url: str, values: dict[str, object]) -> dict[str, np.ndarray]:
    """The last response's outputs; a line is printed for each progress response before it."""
    answers: queue.Queue = queue.Queue()
    client = grpc_client.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer(MODEL, request_inputs(values), enable_empty_final_response=True)
        while True:
            result, error = answers.get()
            if error is not None:
                raise error
            response = result.get_response()
            outputs = {output.name: result.as_numpy(output.name) for output in response.outputs}
            if response.parameters["triton_final_response"].bool_param:
                return outputs
            print(f"round {outputs['ROUNDS'][0]}: {outputs['STEPS_DONE'][0]}/"
                  f"{outputs['STEPS_TOTAL'][0]} steps", flush=True)
    finally:
        client.stop_stream(cancel_requests=True)  # after the final response: nothing to cancel
        client.close()


def save(outputs: dict[str, np.ndarray], out: Path) -> None:
    if "VIDEO" in outputs:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from runtime.video_files import save_video

        save_video(outputs["VIDEO"], out)
    else:
        from PIL import Image

        Image.fromarray(outputs["IMAGE"]).save(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="localhost:8001", help="the server's gRPC HOST:PORT")
    parser.add_argument("--out", type=Path, help="where to save the video or image")
    for field, (_, datatype, _) in FIELDS.items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=PARSERS[datatype])
    args = parser.parse_args(argv)
    values = {field: getattr(args, field) for field in FIELDS if getattr(args, field) is not None}
    try:
        outputs = stream(args.url, values)
    except grpc_client.InferenceServerException as error:
        print(f"error: {error.message()}", file=sys.stderr)
        return 1
    result = outputs.get("VIDEO", outputs.get("IMAGE"))
    print(f"done: {'VIDEO' if 'VIDEO' in outputs else 'IMAGE'} {list(result.shape)} in "
          f"{outputs['ROUNDS'][0]} rounds, {outputs['EVALUATIONS'][0]} evaluations")
    if args.out is not None:
        save(outputs, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
