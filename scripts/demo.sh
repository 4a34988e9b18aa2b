#!/usr/bin/env bash
# The main job: serve models/default.safetensors, stream a generation through lstm-client,
# stop the server. Run by `make demo` after `make setup`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
PROMPT=${PROMPT:-"def fibonacci(n):"}
log=$(mktemp)
"$BIN/lstm-serve" serve --host 127.0.0.1 --port 0 --metrics-port 0 --shutdown-delay 0 >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null; rm -f "$log"' EXIT

target=""
for _ in $(seq 300); do
  target=$(sed -n 's/^lstm-serve: listening on \([0-9.]*:[0-9]*\),.*/\1/p' "$log")
  [ -n "$target" ] && "$BIN/lstm-client" --target "$target" --timeout 2 health >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.2
done
[ -n "$target" ] || { echo "the server did not report its port within 60 s:" >&2; cat "$log" >&2; exit 1; }
echo "server on $target; prompt: $PROMPT" >&2
"$BIN/lstm-client" --target "$target" generate "$PROMPT" --max-tokens "${MAX_TOKENS:-300}" --temperature 0.7 --seed 1
echo
