#!/usr/bin/env bash
# Copy of the workplace tool ../shared/tools/offline-images.sh, for machines that lack it.
# Builds local stand-ins for the public base images that this machine cannot pull:
#   lstm-serve/python:3.11-bookworm   Debian bookworm + python3, venv, pip, and this host's CA bundle
#   lstm-serve/prometheus:bookworm    the same + Debian's prometheus (entrypoint /usr/bin/prometheus)
# Use them with build args / env overrides, e.g.
#   docker build --build-arg BASE_IMAGE=lstm-serve/python:3.11-bookworm .
#   PROMETHEUS_IMAGE=lstm-serve/prometheus:bookworm docker-compose up
# Needs root, a running Docker engine (dockerd) and debootstrap. Takes about 2 minutes the first time;
# later calls reuse the images. Exit 0 when both images exist.
set -euo pipefail
PY_IMAGE=${PY_IMAGE:-lstm-serve/python:3.11-bookworm}
PROM_IMAGE=${PROM_IMAGE:-lstm-serve/prometheus:bookworm}
have() { docker image inspect "$1" >/dev/null 2>&1; }

if ! docker info >/dev/null 2>&1; then
  echo "offline-images: no Docker engine answers; start one: (dockerd >/tmp/dockerd.log 2>&1 &)" >&2
  exit 1
fi
if ! have "$PY_IMAGE"; then
  command -v debootstrap >/dev/null || { echo "offline-images: apt-get install -y debootstrap" >&2; exit 1; }
  root=$(mktemp -d /tmp/offline-rootfs.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$root" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import \
    -c 'ENV LANG=C.UTF-8 PIP_CERT=/etc/ssl/certs/ca-certificates.crt' -c 'CMD ["python3"]' - "$PY_IMAGE" >/dev/null
  echo "offline-images: built $PY_IMAGE"
fi
if ! have "$PROM_IMAGE"; then
  ctx=$(mktemp -d /tmp/offline-prom.XXXXXX)
  cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM $PY_IMAGE
RUN apt-get update && apt-get install -y --no-install-recommends prometheus && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
DOCKERFILE
  docker build -q -t "$PROM_IMAGE" "$ctx" >/dev/null
  rm -rf "$ctx"
  echo "offline-images: built $PROM_IMAGE"
fi
echo "offline-images: $PY_IMAGE and $PROM_IMAGE are ready"
