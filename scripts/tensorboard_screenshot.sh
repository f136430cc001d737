#!/usr/bin/env bash
# A PNG of TensorBoard's HParams view of a sweep, taken with headless Chromium (Debian: apt-get install
# chromium-headless-shell). Usage:
#   scripts/tensorboard_screenshot.sh <sweep dir> <out.png> [view: hparams | scalars | images] [width,height]
# Starts TensorBoard on a free loopback port, waits until it answers, lets the page render, then stops it.
set -euo pipefail
logdir=$1 out=$2 view=${3:-hparams} size=${4:-1600,900}
root=$(cd "$(dirname "$0")/.." && pwd)
browser=$(command -v chromium-headless-shell || command -v chromium || command -v google-chrome || true)
[ -n "$browser" ] || { echo "no headless Chromium: apt-get install chromium-headless-shell" >&2; exit 2; }
port=$("$root/.venv/bin/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$root/.venv/bin/tensorboard" --logdir "$logdir" --host 127.0.0.1 --port "$port" >/dev/null 2>&1 &
tb=$!
trap 'kill $tb 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$port/data/environment" >/dev/null 2>&1 && break
  sleep 0.5
done
sleep 3  # the first scan of the event files
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="$size" \
  --virtual-time-budget=20000 --screenshot="$out" "http://127.0.0.1:$port/#$view" >/dev/null 2>&1
echo "wrote $out"
