#!/usr/bin/env bash
# Any audio folder (+ an optional noise folder) -> bins -> NEST pretraining.
#   bash recipes/folder/run.sh --speech-dir /data/my_audio [--noise-dir /data/noise] [--dev-fraction 0.01]
#       [--config configs/nest_fast-conformer.yaml] [--stage N] [--stop-stage N] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
speech_dir=
noise_dir=
config=configs/nest_fast-conformer.yaml
jobs=$(nproc)
window=30
dev_cuts=200
work=data/folder
exp=exp/folder_nest
extra_args=()
source recipes/stages.sh
[ -n "$speech_dir" ] || { echo "give --speech-dir"; exit 1; }

if run_stage 1 prepare; then
  python prepare.py audio-dir "$speech_dir" "$work/all" --window "$window" --min-duration 1 --jobs "$jobs"
  python -m cuts.split "$work/all/cuts.jsonl.gz" "$work" --dev-cuts "$dev_cuts"
  if [ -n "$noise_dir" ]; then python prepare.py noise "$noise_dir" "$work/noise" --jobs "$jobs"; fi
  done_stage 1 prepare
fi
if run_stage 2 bins; then
  python prepare.py bins "$work/train.jsonl.gz" --buckets 30 --out "$work/bins.yaml"
  done_stage 2 bins
fi
if run_stage 3 train; then
  noise=(); [ -n "$noise_dir" ] && noise=(data.noise_cuts="[$work/noise/cuts.jsonl.gz]")
  python train.py --config "$config" data.train_cuts="[$work/train.jsonl.gz]" data.val_cuts="[$work/dev.jsonl.gz]" \
    data.bins="$work/bins.yaml" exp_dir="$exp" resume=auto "${noise[@]}" "${extra_args[@]}"
  done_stage 3 train
fi
