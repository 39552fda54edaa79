#!/usr/bin/env bash
# Screenshots of a report card and a leaderboard for docs/, with Debian's headless Chromium.
#   scripts/screenshots.sh runs/fmnist_fast/report.html compare/compare.html
set -euo pipefail
cd "$(dirname "$0")/.."
shot() {
  local page=$1 out=$2 height=$3 profile
  profile=$(mktemp -d)
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
    --virtual-time-budget=5000 --window-size=1280,"$height" --screenshot="$out" "file://$(realpath "$page")" 2>/dev/null
  rm -rf "$profile"
  echo "wrote $out"
}
mkdir -p docs
shot "${1:-runs/fmnist_fast/report.html}" docs/report.png 3600
shot "${2:-compare/compare.html}" docs/compare.png 1560
