#!/usr/bin/env bash
# The GPU configs' throughput and memory, and every family's CUDA path, in one run on a lent GPU
# machine (bench/RESULTS.md, "On a GPU"). Offline there: SD's VAE and the pretrained open_clip
# ViT-B-32 are replaced by randomly initialised models of the same architecture, which cost the
# same per step (the figures are speed and memory, not quality).
#
#   bash bench/gpu_check.sh RAW_DIR OUT_DIR      # RAW_DIR: captioned images (e.g. part of demo/raw)
#
# Stages, most important first, each under its own time limit and all under DEADLINE_S:
#   latent256  configs/latent-256-gpu.yaml (diffusers codec, DiT-B/2, ViT-B-32 text tower), then
#              `vgen generate` of 32 images at the config's 30 steps and guidance 4
#   families   clip, gan, tokenizer + ar, vae + latent flow, text VAE, flow (DiT and UNet) on CUDA:
#              TINY_STEPS steps each, then 8 images generated at --batch-size 8 and 1 (same pixels?)
#   flow64     configs/flow-64-gpu.yaml (pixels, DiT-B/2 at 1,024 tokens)
# OUT_DIR gets summary.txt (a line per stage), summary.json (images/s, peak GiB, losses per run)
# and logs.tar.gz, rewritten after every stage so that a run cut short still reports.
# Measured stages can be skipped (SKIP="latent256 clip ..."; a skipped stage's dependants skip too).
# A rehearsal on CPU: DEVICE=cpu BIG_STEPS=4 TINY_STEPS=4 BIG_SET="flow.network.width=64 ..." bash ...
set -u
RAW=$(realpath "$1"); OUT=$(realpath -m "$2"); mkdir -p "$OUT"
WORK=${WORK:-/tmp/vgen-gpu}; rm -rf "$WORK"; mkdir -p "$WORK/logs"
DEVICE=${DEVICE:-cuda}
BIG_STEPS=${BIG_STEPS:-200}
TINY_STEPS=${TINY_STEPS:-100}
BIG_SET=${BIG_SET:-}
DEADLINE_S=${DEADLINE_S:-540}
SKIP=${SKIP:-}  # stage names not to run, e.g. SKIP="latent256" once its figures are in bench/RESULTS.md
VGEN=${VGEN:-python3 -m vgen}
T0=$(date +%s)
export PYTHONUNBUFFERED=1

report() {
  tar -czf "$OUT/logs.tar.gz.tmp" -C "$WORK" logs && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
  python3 bench/gpu_summary.py "$WORK" > "$OUT/summary.json.tmp" 2>>"$WORK/logs/summary.err" \
    && mv "$OUT/summary.json.tmp" "$OUT/summary.json"
}

# stage NAME LIMIT_S COMMAND...: run under min(LIMIT_S, time left), log to logs/NAME.log
stage() {
  local name=$1 limit=$2; shift 2
  if [[ " $SKIP " == *" $name "* ]]; then echo "$name skipped: SKIP" | tee -a "$OUT/summary.txt"; return 1; fi
  local left=$(( DEADLINE_S - ($(date +%s) - T0) ))
  (( left < limit )) && limit=$left
  if (( limit < 5 )); then echo "$name skipped: deadline" | tee -a "$OUT/summary.txt"; return 1; fi
  local start=$(date +%s)
  timeout "$limit" bash -c '"$@"' _ "$@" > "$WORK/logs/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
  return $rc
}

train() {  # train NAME CONFIG DATA [--set ...]
  local name=$1 config=$2 data=$3; shift 3
  $VGEN train -c "$config" -d "$data" -o "$WORK/$name" --set "train.device=$DEVICE" "$@"
}

same_pixels() {  # same_pixels RUN: 8 images at --batch-size 8 and 1; are the PNGs' pixels the same?
  local run=$1
  for bs in 8 1; do
    $VGEN generate "a cat above a dog" "a frog and a car" --run "$WORK/$run" -n 4 --seed 7 --batch-size $bs \
      --device "$DEVICE" --out "$WORK/$run-gen-b$bs" --json > "$WORK/$run-gen-b$bs.json" || return 1
  done
  python3 - "$WORK/$run-gen-b8" "$WORK/$run-gen-b1" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
a, b = (sorted(Path(d).glob("*.png")) for d in sys.argv[1:3])
assert len(a) == len(b) == 8, (len(a), len(b))
diff = [int(np.abs(np.asarray(Image.open(x), np.int16) - np.asarray(Image.open(y), np.int16)).max()) for x, y in zip(a, b)]
print("batch 8 vs 1, max level difference per image:", diff)
EOF
}

export -f train same_pixels
export WORK DEVICE VGEN
: > "$OUT/summary.txt"
stage env 60 bash -c 'nvidia-smi; python3 -c "import torch, open_clip, typer, diffusers; print(torch.__version__, torch.version.cuda, open_clip.__version__, typer.__version__, diffusers.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no cuda\")"'
stage data 120 bash -c "$VGEN preprocess '$RAW' -o '$WORK/ds32' --resolution 32 --workers 8 && \
  $VGEN preprocess '$RAW' -o '$WORK/ds64' --resolution 64 --workers 8 && \
  $VGEN preprocess '$RAW' -o '$WORK/ds256' --resolution 256 --min-size 32 --workers 8"
# SD's VAE architecture (stabilityai/sd-vae-ft-mse's config), randomly initialised
stage sdvae 60 python3 -c "
from diffusers import AutoencoderKL
AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=('DownEncoderBlock2D',) * 4,
              up_block_types=('UpDecoderBlock2D',) * 4, layers_per_block=2, latent_channels=4,
              sample_size=256, norm_num_groups=32).save_pretrained('$WORK/sdvae', safe_serialization=True)"
report

BIG=(--set text_encoder.source=random --set "train.steps=$BIG_STEPS" --set train.log_every=20
     --set "train.checkpoint_every=$BIG_STEPS" --set "train.val_every=$BIG_STEPS" --set "train.sample_every=$BIG_STEPS"
     --set optim.warmup_steps=20)
for s in $BIG_SET; do BIG+=(--set "$s"); done
stage latent256 240 train latent256 configs/latent-256-gpu.yaml "$WORK/ds256" --set "codec=diffusers:$WORK/sdvae" "${BIG[@]}" \
  && stage latent256-generate 60 $VGEN generate "a cat above a dog" --run "$WORK/latent256" -n 32 --batch-size 32 \
       --device "$DEVICE" --out "$WORK/latent256-gen" --json
report

TINY=(--set "train.steps=$TINY_STEPS" --set train.log_every=10 --set "train.checkpoint_every=$TINY_STEPS"
      --set "train.val_every=$TINY_STEPS" --set "train.sample_every=$TINY_STEPS" --set train.compile=false)
CLIP=(--set "text_encoder.source=run:$WORK/clip")
# The families whose CUDA paths were least run first (a process there takes 10 - 25 s to start).
stage clip 60 train clip configs/clip-tiny.yaml "$WORK/ds32" "${TINY[@]}"
stage gan 60 train gan configs/gan-tiny-cpu.yaml "$WORK/ds32" "${TINY[@]}" "${CLIP[@]}" \
  && stage gan-same-pixels 40 same_pixels gan
report
stage tokenizer 60 train tokenizer configs/tokenizer-tiny-cpu.yaml "$WORK/ds32" "${TINY[@]}" \
  && stage ar 60 train ar configs/ar-tiny-cpu.yaml "$WORK/ds32" "${TINY[@]}" "${CLIP[@]}" --set "codec=run:$WORK/tokenizer" \
  && stage ar-same-pixels 40 same_pixels ar
report
stage vae 60 train vae configs/vae-tiny-cpu.yaml "$WORK/ds64" "${TINY[@]}" \
  && stage latent64 60 train latent64 configs/latent-64-cpu.yaml "$WORK/ds64" "${TINY[@]}" "${CLIP[@]}" --set "codec=run:$WORK/vae" \
  && stage latent64-same-pixels 40 same_pixels latent64
report
for pair in vaetext:vae-text-cpu flow:tiny-cpu unet:unet-tiny-cpu; do
  name=${pair%%:*}; config=configs/${pair#*:}.yaml
  stage "$name" 60 train "$name" "$config" "$WORK/ds32" "${TINY[@]}" "${CLIP[@]}" && stage "$name-same-pixels" 40 same_pixels "$name"
  report
done

stage flow64 200 train flow64 configs/flow-64-gpu.yaml "$WORK/ds64" "${BIG[@]}" --set "train.steps=$(( BIG_STEPS / 2 ))" \
  --set "train.checkpoint_every=$(( BIG_STEPS / 2 ))" --set "train.val_every=$(( BIG_STEPS / 2 ))" \
  --set "train.sample_every=$(( BIG_STEPS / 2 ))"
report
echo "total $(( $(date +%s) - T0 )) s" | tee -a "$OUT/summary.txt"
