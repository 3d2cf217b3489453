#!/usr/bin/env bash
# Join this node to a running Ray cluster as a worker (its GPUs become available to replicas).
#
#   RAY_AUTH_TOKEN=<token from the head> deploy/ray/join-worker.sh HEAD_IP:6379
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 HEAD_IP:PORT   (with RAY_AUTH_TOKEN set to the head's token)" >&2
    exit 2
fi
ADDRESS="$1"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
if [[ "$RAY_AUTH_MODE" == "token" && -z "${RAY_AUTH_TOKEN:-}" ]]; then
    echo "RAY_AUTH_TOKEN is not set: copy it from the head node (ray get-auth-token)" >&2
    exit 2
fi

# shellcheck disable=SC2086  # RAY_START_ARGS is a list of flags
ray start --address="$ADDRESS" ${RAY_START_ARGS:-}
echo "joined the Ray cluster at $ADDRESS"
