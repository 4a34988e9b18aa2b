#!/usr/bin/env bash
# End-to-end test of the image and `docker compose up` on a machine without Docker Hub:
# build the offline base images, build our image with the local CPU torch wheel, start
# trainer (1-minute budget) -> server -> Prometheus, stream a generation through lstm-client
# on the published port, check that Prometheus scraped the server; then the scale-out overlay
# (docker-compose.scale.yml: Redis, three replicas, HAProxy as `server`) on the same trained
# model, with tests/test_compose_scale.py killing a replica mid-stream through the published
# port; and tear everything down (volumes too), also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
PROJECT=lstmserve-e2e
OFFLINE_IMAGES=../shared/tools/offline-images.sh
[ -f "$OFFLINE_IMAGES" ] || OFFLINE_IMAGES=deploy/offline-images.sh
export LSTM_SERVE_IMAGE=lstm-serve:e2e
export BASE_IMAGE=lstm-serve/python:3.11-bookworm
export PROMETHEUS_IMAGE=lstm-serve/prometheus:bookworm
export HAPROXY_IMAGE=lstm-serve/haproxy:bookworm
export REDIS_IMAGE=lstm-serve/redis:bookworm
export TRAIN_MINUTES=${TRAIN_MINUTES:-1}
export PUBLISH_HOST=127.0.0.1
free_port() { "$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export GRPC_PORT=$(free_port) METRICS_PORT=$(free_port) PROMETHEUS_PORT=$(free_port)
compose() { docker-compose -p "$PROJECT" -f docker-compose.yml "$@"; }
scaled() { docker-compose -p "$PROJECT" -f docker-compose.yml -f docker-compose.scale.yml "$@"; }
wait_healthy() {  # wait_healthy SERVICE: until Docker reports its container healthy
  local health=
  for _ in $(seq 120); do
    health=$(docker inspect --format '{{.State.Health.Status}}' "$(scaled ps -q "$1")" 2>/dev/null || true)
    [ "$health" = healthy ] && return 0
    sleep 2
  done
  echo "$1 never became healthy" >&2
  return 1
}
step() { printf '\n== %s (%ss)\n' "$*" "$SECONDS"; }

step "docker engine"
if ! docker info >/dev/null 2>&1; then
  (dockerd >/tmp/dockerd.log 2>&1 &)
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi
docker info >/dev/null

step "offline base images"
bash "$OFFLINE_IMAGES"

step "image build (local CPU torch wheel in wheels/)"
wheel_dir=$("$BIN/pip" config list 2>/dev/null | sed -n "s/^.*find-links='\(.*\)'$/\1/p" | head -1)
cp -f "${wheel_dir:-/opt/wheels}"/torch-*+cpu-cp311-*.whl wheels/
trap 'rm -f wheels/torch-*.whl' EXIT
docker build -q --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$LSTM_SERVE_IMAGE" . >/dev/null
docker image inspect "$LSTM_SERVE_IMAGE" --format 'image size: {{.Size}} bytes'

cleanup() {
  status=$?
  if [ $status -ne 0 ]; then scaled logs --tail=40 || true; fi
  scaled down -v --remove-orphans >/dev/null 2>&1 || true
  rm -f wheels/torch-*.whl
  exit $status
}
trap cleanup EXIT

step "docker-compose up: trainer -> server, prometheus"
compose up -d server prometheus
wait_healthy server
[ "$(docker inspect --format '{{.State.ExitCode}}' "$(compose ps -q trainer)")" = 0 ]

step "generate through the published port"
text=$("$BIN/lstm-client" --target "127.0.0.1:$GRPC_PORT" generate "def " --max-tokens 60 --seed 1)
printf '%s\n' "$text"
[ -n "$text" ]

step "Prometheus scraped the server"
query="http://127.0.0.1:$PROMETHEUS_PORT/api/v1/query?query=up%7Bjob%3D%22lstm-serve%22%7D"
for _ in $(seq 60); do
  curl -fsS "$query" | grep -q '"value":\[[0-9.]*,"1"\]' && { echo "up{job=\"lstm-serve\"} == 1"; break; }
  sleep 2
done
curl -fsS "$query" | grep -q '"value":\[[0-9.]*,"1"\]'

step "scale-out overlay: redis, three replicas, HAProxy as server (the trained model reused)"
scaled up -d server prometheus
wait_healthy server
step "a replica killed mid-stream, through the published port"
LSTM_SERVE_COMPOSE_PROJECT=$PROJECT LSTM_SERVE_COMPOSE_TARGET="127.0.0.1:$GRPC_PORT" \
  LSTM_SERVE_COMPOSE_PROMETHEUS=$PROMETHEUS_PORT "$BIN/python" -m pytest -q -p no:cacheprovider \
  tests/test_compose_scale.py
step "passed"
