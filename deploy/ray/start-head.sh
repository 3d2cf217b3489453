#!/usr/bin/env bash
# Start the Ray head node of a cluster the server (and the training job) run on.
#
#   deploy/ray/start-head.sh            # then on every other node: deploy/ray/join-worker.sh HEAD_IP:6379
#
# Ray token authentication is on: the token is made once here (or taken from RAY_AUTH_TOKEN)
# and must be given to every worker (same RAY_AUTH_TOKEN). Extra `ray start` flags go in
# RAY_START_ARGS, split on spaces (so no value with a space in it), e.g.
# RAY_START_ARGS="--num-gpus=8 --num-cpus=64".
set -euo pipefail

PORT="${RAY_PORT:-6379}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
if [[ "$RAY_AUTH_MODE" == "token" && -z "${RAY_AUTH_TOKEN:-}" ]]; then
    RAY_AUTH_TOKEN="$(ray get-auth-token --generate)"
    export RAY_AUTH_TOKEN
fi

# shellcheck disable=SC2086  # RAY_START_ARGS is a list of flags
ray start --head --port="$PORT" --dashboard-host=127.0.0.1 ${RAY_START_ARGS:-}

HEAD_IP="$(hostname -I 2>/dev/null | awk '{print $1}')"
echo
echo "Ray head is up at ${HEAD_IP:-<this host>}:$PORT. On each worker node run:"
echo "  RAY_AUTH_TOKEN=<the token> deploy/ray/join-worker.sh ${HEAD_IP:-HEAD_IP}:$PORT"
echo "(print the token here with: ray get-auth-token)"
echo "Then start the server on this node with model_engine_server.ray.address=auto, e.g."
echo "  MODEL_ENGINE_SERVER_TOKEN=<an admin token> model-engine-server serve --config deploy/fully-async-megatron-40gpu.yaml"
echo "(it listens on 0.0.0.0, so it refuses to start without an admin token)"
