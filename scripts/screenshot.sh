#!/usr/bin/env bash
# Screenshots of every step of the app, in a virtual X display: opens the window with a fixture
# model and the WWDC25 dataset, starts a short real training run, stops it, asks the base and the
# tuned model one question in the Try step, and saves one PNG per step panel (plus the app's
# frame-time log) under the output folder.
#
#   scripts/screenshot.sh [out-dir] [model-dir] [train.jsonl]
#   FT_BIN=target/release/finetune FRAME_LOG=continuous TRAIN_SECS=60 scripts/screenshot.sh ...
#     (the release app, repainting every frame so the frame-time figures cover many frames)
#
# Needs: Xvfb, xdotool, ImageMagick (`import`), Mesa's software OpenGL
#   apt-get install -y xvfb xdotool imagemagick libgl1-mesa-dri
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-target/screenshots}
MODEL=${2:-tests/fixtures/tiny-llama}
DATA=${3:-../shared/data/wwdc25-train.jsonl}
TRAIN_SECS=${TRAIN_SECS:-30}
DISPLAY_NUM=${DISPLAY_NUM:-:97}

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BIN=${FT_BIN:-target/debug/finetune}
[[ -n "${FT_BIN:-}" ]] || cargo build --bin finetune

# A fresh home: no saved settings, and runs are written under it.
FAKE_HOME=$(mktemp -d)
Xvfb "$DISPLAY_NUM" -screen 0 1400x900x24 >"$OUT/xvfb.log" 2>&1 &
XVFB=$!
cleanup() {
    [[ -n "${APP:-}" ]] && kill "$APP" 2>/dev/null || true
    kill "$XVFB" 2>/dev/null || true
}
trap cleanup EXIT
sleep 1

HOME=$FAKE_HOME XDG_DATA_HOME=$FAKE_HOME/.local/share DISPLAY=$DISPLAY_NUM \
    LIBGL_ALWAYS_SOFTWARE=1 FINETUNE_FRAME_LOG=${FRAME_LOG:-1} \
    "$BIN" "$MODEL" "$DATA" >"$OUT/app.log" 2>&1 &
APP=$!

WID=""
for _ in $(seq 1 50); do
    WID=$(DISPLAY=$DISPLAY_NUM xdotool search --name '^FineTune$' 2>/dev/null | head -1 || true)
    [[ -n "$WID" ]] && break
    sleep 0.2
done
[[ -n "$WID" ]] || { echo "the window did not open; see $OUT/app.log" >&2; exit 1; }
export DISPLAY=$DISPLAY_NUM
xdotool windowfocus --sync "$WID"
sleep 3 # model summary and dataset read

key() { xdotool key --window "$WID" "$1"; sleep "${2:-1}"; }
shot() { import -window root "$OUT/$1.png"; echo "$OUT/$1.png"; }

key ctrl+1; shot 1-model
key ctrl+2; shot 2-dataset
key ctrl+3; shot 3-settings
key ctrl+Return "$TRAIN_SECS"; shot 4-train-running
key ctrl+period 3; shot 4-train-stopped
# The sample answers under the charts: scroll the chart area down.
xdotool mousemove --window "$WID" 700 400 click --repeat 15 --delay 30 5; sleep 1; shot 4-train-samples
key ctrl+5
xdotool type --window "$WID" --delay 20 "${TRY_PROMPT:-What is new in SwiftUI this year?}"
key ctrl+Return "${TRY_SECS:-10}"; shot 5-try
key ctrl+6; shot 6-export
# The Ollama format (its radio button is the fourth; positions are for the 1400x900 screen):
# the quantization table with each type's size, then the export and its result.
xdotool mousemove --window "$WID" 205 205 click 1; sleep 2; shot 6-export-ollama
xdotool mousemove --window "$WID" 225 "${EXPORT_BUTTON_Y:-538}" click 1; sleep "${EXPORT_SECS:-8}"; shot 6-export-ollama-done

kill "$APP"
wait "$APP" 2>/dev/null || true
APP=""
echo "frame times (from $OUT/app.log):"
grep 'frame time' "$OUT/app.log" | tail -3
