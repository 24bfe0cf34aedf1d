#!/usr/bin/env bash
# Start one Triton server of a DRiffusion cluster (the image of deploy/Dockerfile runs this).
#
#   ROLE=device  the unet model of this server's GPU, nothing else (`--no-pipeline-model`)
#   ROLE=front   the `driffusion` model over the device servers in DEVICE_ENDPOINTS, plus the
#                text encoder(s) and VAE decoder; no UNet of its own (DEVICES=0)
#   ROLE=encoder the tokenizer(s) and text encoder(s) alone (`--encoders-only`), for fronts
#                whose ENCODER_ENDPOINTS name it: an LLM encoder on a GPU of its own
#
# Environment (defaults in brackets):
#   MODEL             engines/<model> directory on the shared engines volume, or `sim`
#   GPU_KEY           which engines/<model>/<GPU_KEY>/ set to serve: the one built for this GPU
#                     type (a plan loads on every GPU of the model it was built on) []
#   BACKEND           tensorrt or onnxruntime [tensorrt]
#   DEVICES           device models of this server [device: 1, its one GPU; front: 0]
#   DEVICE_ENDPOINTS  front: the device servers' gRPC HOST:PORT, comma-separated
#   ENCODER_ENDPOINTS front: encoder servers' gRPC HOST:PORT, comma-separated; the front then
#                     serves no text encoder of its own [none]
#   DEADLINE_S        deadline of every front-to-device call, seconds [30]
#   HOST              the one address to bind (a pod sets its pod IP) [0.0.0.0]
#   HTTP_PORT, GRPC_PORT, METRICS_PORT   [8000, 8001, 8002]
#   REPOSITORY        where to write the model repository [/tmp/driffusion-repository]
#   WAIT_S            front: how long to wait for the device servers before giving up [600]
#   EXTRA_ARGS        more `driffusion triton-repo` flags (e.g. --pipeline-instances 4) []
#   DRY_RUN           1: write the repository and print the tritonserver command instead of
#                     running it; nul: the same, NUL-separated (for tests)
set -euo pipefail

role=${ROLE:?set ROLE=device, ROLE=encoder or ROLE=front}
model=${MODEL:?set MODEL to an engines/<model> directory}
host=${HOST:-0.0.0.0}
repository=${REPOSITORY:-/tmp/driffusion-repository}
args=(--model "$model" --backend "${BACKEND:-tensorrt}" --repository "$repository"
      --deadline-s "${DEADLINE_S:-30}")
if [[ -n ${GPU_KEY:-} ]]; then
    args+=(--gpu-key "$GPU_KEY")
fi
case $role in
    device)
        args+=(--devices "${DEVICES:-1}" --no-pipeline-model) ;;
    encoder)
        args+=(--encoders-only) ;;
    front)
        endpoints=${DEVICE_ENDPOINTS:?set DEVICE_ENDPOINTS=HOST:PORT,... for a front server}
        args+=(--devices "${DEVICES:-0}" --device-endpoints "$endpoints")
        # the driffusion model finds its devices when it loads: wait until they serve
        if [[ -z ${DRY_RUN:-} ]]; then
            python3 -m triton_models.device_endpoints wait "$endpoints" \
                --timeout-s "${WAIT_S:-600}"
        fi
        if [[ -n ${ENCODER_ENDPOINTS:-} ]]; then
            args+=(--encoder-endpoints "$ENCODER_ENDPOINTS")
            if [[ -z ${DRY_RUN:-} ]]; then
                python3 -m triton_models.device_endpoints wait "$ENCODER_ENDPOINTS" \
                    --models 'text_encoder*' --timeout-s "${WAIT_S:-600}"
            fi
        fi ;;
    *)
        echo "ROLE must be device, encoder or front, not '$role'" >&2
        exit 2 ;;
esac
# shellcheck disable=SC2206 # EXTRA_ARGS is a list of flags on purpose
args+=(${EXTRA_ARGS:-})
driffusion triton-repo "${args[@]}" >&2

# Triton's shared-memory, trace and logging APIs are closed to every client, as
# `driffusion serve` closes them: the header value holds a line break, which no client can send.
restricted="shared-memory,trace,logging:driffusion-admin=closed"$'\n'"to-every-client"
server=(tritonserver --model-repository="$repository"
        --grpc-address="$host" --grpc-port="${GRPC_PORT:-8001}"
        --http-address="$host" --http-port="${HTTP_PORT:-8000}"
        --allow-metrics=true --metrics-address="$host" --metrics-port="${METRICS_PORT:-8002}"
        --exit-timeout-secs=10 --disable-auto-complete-config
        --grpc-restricted-protocol="$restricted" --http-restricted-api="$restricted")
case ${DRY_RUN:-} in
    "") exec "${server[@]}" ;;
    nul) printf '%s\0' "${server[@]}" ;;
    *) printf '%q ' "${server[@]}"; echo ;;
esac
