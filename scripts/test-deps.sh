#!/usr/bin/env bash
# What `make test` needs beyond Python: Prometheus and promtool (tests/test_metrics.py),
# util-linux's unshare and nsenter (the durability fault tests), HAProxy (tests/test_haproxy.py) and Redis (tests/test_session_store.py). Installed with apt-get when
# missing and running as root; otherwise one line says what to install.
set -euo pipefail
missing=()
command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus)
command -v unshare >/dev/null && command -v nsenter >/dev/null || missing+=(util-linux)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v redis-server >/dev/null || missing+=(redis-server)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "make test: installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "make test needs ${missing[*]}: install them (Debian/Ubuntu: sudo apt-get install ${missing[*]}) and run it again" >&2
  exit 1
fi
