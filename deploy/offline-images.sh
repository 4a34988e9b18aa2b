#!/usr/bin/env bash
# Copy of the workplace tool ../shared/tools/offline-images.sh, for machines that lack it.
# Builds local stand-ins for the public base images that this machine cannot pull:
#   lstm-serve/python:3.11-bookworm   Debian bookworm + python3, venv, pip, and this host's CA bundle
#   lstm-serve/prometheus:bookworm    the same + Debian's prometheus (entrypoint /usr/bin/prometheus)
#   lstm-serve/haproxy:bookworm       the same + Debian's haproxy 2.6 (entrypoint haproxy -W -db -f /usr/local/etc/haproxy/haproxy.cfg)
#   lstm-serve/redis:bookworm         the same + Debian's redis-server 7.0 (entrypoint redis-server, port 6379, data in /data)
# Use them with build args / env overrides, e.g.
#   docker build --build-arg BASE_IMAGE=lstm-serve/python:3.11-bookworm .
#   PROMETHEUS_IMAGE=lstm-serve/prometheus:bookworm HAPROXY_IMAGE=lstm-serve/haproxy:bookworm \
#     REDIS_IMAGE=lstm-serve/redis:bookworm docker-compose up
# Needs root, a running Docker engine (dockerd) and debootstrap. Takes about 2 minutes the first time;
# later calls reuse the images. Exit 0 when all images exist.
set -euo pipefail
PY_IMAGE=${PY_IMAGE:-lstm-serve/python:3.11-bookworm}
PROM_IMAGE=${PROM_IMAGE:-lstm-serve/prometheus:bookworm}
HAPROXY_IMAGE=${HAPROXY_IMAGE:-lstm-serve/haproxy:bookworm}
REDIS_IMAGE=${REDIS_IMAGE:-lstm-serve/redis:bookworm}
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
# debian_image IMAGE PACKAGE ENTRYPOINT-JSON CMD-JSON: the Python base plus one Debian package
debian_image() {
  have "$1" && return 0
  local ctx; ctx=$(mktemp -d /tmp/offline-img.XXXXXX)
  cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM $PY_IMAGE
RUN apt-get update && apt-get install -y --no-install-recommends $2 && rm -rf /var/lib/apt/lists/* && mkdir -p /data /usr/local/etc/haproxy
ENTRYPOINT $3
CMD $4
DOCKERFILE
  docker build -q -t "$1" "$ctx" >/dev/null
  rm -rf "$ctx"
  echo "offline-images: built $1"
}
debian_image "$HAPROXY_IMAGE" haproxy '["haproxy", "-W", "-db"]' '["-f", "/usr/local/etc/haproxy/haproxy.cfg"]'
debian_image "$REDIS_IMAGE" redis-server '["redis-server"]' '["--bind", "0.0.0.0", "--protected-mode", "no", "--dir", "/data", "--appendonly", "yes", "--appendfsync", "always"]'
echo "offline-images: $PY_IMAGE, $PROM_IMAGE, $HAPROXY_IMAGE and $REDIS_IMAGE are ready"
