#!/usr/bin/env bash
# A change that should change no result, checked: the same config on the same data, once with the
# code of an earlier commit and once with the working tree, must give byte-identical datasets,
# bit-identical checkpoints (model, EMA, optimizer) of both kinds, the same metrics.jsonl (less
# timings) and the same PNGs.
#
#   bash bench/same_results.sh 39c3cde [WORK_DIR]     (about 10 minutes on 2 cores)
#
# Short runs of the demo's own configs: clip-tiny for 60 steps, tiny-cpu for 150 (eager: compiling
# changes no number, tests/test_train.py checks that), both at the precision `auto` picks here.
set -euo pipefail
REV=${1:?usage: same_results.sh GIT_REV [WORK_DIR]}
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${2:-$REPO/.bench/same-results}
PY=$REPO/.venv/bin/python
rm -rf "$WORK" && mkdir -p "$WORK" && cd "$WORK"
git -C "$REPO" worktree add -q --detach "$WORK/old-code" "$REV"
trap 'git -C "$REPO" worktree remove --force "$WORK/old-code"' EXIT
old() { env PYTHONPATH="$WORK/old-code" "$PY" -m vgen "$@"; }
new() { env PYTHONPATH="$REPO" "$PY" -m vgen "$@"; }
same() { [ "$(sha256sum < "$1")" = "$(sha256sum < "$2")" ] && echo same || echo DIFFERENT; }

new data emoji-scenes raw --count 3000 --seed 0 2>/dev/null
old preprocess raw -o ds-old -r 32 --workers 1 2>/dev/null
new preprocess raw -o ds-new -r 32 --workers 1 2>/dev/null
for f in index.jsonl skipped.jsonl $(cd ds-old && ls shards/*); do echo "dataset $f: $(same "ds-old/$f" "ds-new/$f")"; done

CLIP=(--set train.steps=60 --set train.checkpoint_every=30 --set train.val_every=30)
old train -c "$REPO/configs/clip-tiny.yaml" -d ds-old -o clip-old "${CLIP[@]}" 2>/dev/null
new train -c "$REPO/configs/clip-tiny.yaml" -d ds-new -o clip-new "${CLIP[@]}" 2>/dev/null
FLOW=(--set train.steps=150 --set train.compile=false --set train.checkpoint_every=75 --set train.val_every=75
      --set train.sample_every=150 --set text_encoder.source=run:clip-old)
old train -c "$REPO/configs/tiny-cpu.yaml" -d ds-old -o flow-old "${FLOW[@]}" 2>/dev/null
new train -c "$REPO/configs/tiny-cpu.yaml" -d ds-new -o flow-new "${FLOW[@]}" 2>/dev/null
"$PY" - <<'PY'
import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

for kind in ("clip", "flow"):
    for checkpoint in sorted(Path(f"{kind}-old/checkpoints").iterdir()):
        for stem in ("model", "ema", "optimizer"):
            a = load_file(str(checkpoint / f"{stem}.safetensors"))
            b = load_file(str(Path(f"{kind}-new/checkpoints") / checkpoint.name / f"{stem}.safetensors"))
            # Optimizer state is keyed by phase since the family seam ("denoiser.state.0.exp_avg");
            # a commit before it has one optimizer and no phase in its keys.
            if stem == "optimizer" and all(k.startswith("state.") for k in a):
                b = {k.split(".", 1)[1] if not k.startswith("state.") else k: v for k, v in b.items()}
            same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            print(f"{kind} {checkpoint.name} {stem}: {len(a)} tensors, {'bit-identical' if same else 'DIFFERENT'}")
    rows = {side: [{k: v for k, v in json.loads(line).items() if k not in ("time", "images_per_s")}
                   for line in Path(f"{kind}-{side}/metrics.jsonl").read_text().splitlines()] for side in ("old", "new")}
    print(f"{kind} metrics.jsonl: {'identical' if rows['old'] == rows['new'] else 'DIFFERENT'} ({len(rows['old'])} rows)")
    precision = {side: yaml.safe_load(Path(f"{kind}-{side}/run.yaml").read_text())["environment"]["precision"]
                 for side in ("old", "new")}
    print(f"{kind} precision: old {precision['old']}, new {precision['new']}")
PY
old generate "a cat above a dog" "two fish" --run flow-old -n 4 --out gen-old 2>/dev/null
new generate "a cat above a dog" "two fish" --run flow-old -n 4 --out gen-new 2>/dev/null
for f in $(cd gen-old && ls ./*.png); do echo "png $f: $(same "gen-old/$f" "gen-new/$f")"; done
