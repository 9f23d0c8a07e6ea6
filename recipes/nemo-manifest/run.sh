#!/usr/bin/env bash
# NeMo JSON-lines manifests (as NeMo and nest_ssl_project use) -> CutSets -> bins -> NEST pretraining.
#   bash recipes/nemo-manifest/run.sh --train "a.json b.json" --dev dev.json [--noise noise.json]
#       [--config configs/nest_fast-conformer.yaml] [--stage N] [--stop-stage N] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
train=
dev=
noise=
config=configs/nest_fast-conformer.yaml
jobs=$(nproc)
work=data/nemo_manifest
exp=exp/nemo_manifest_nest
extra_args=()
source recipes/stages.sh
[ -n "$train" ] && [ -n "$dev" ] || { echo "give --train and --dev manifests"; exit 1; }

if run_stage 1 prepare; then
  python prepare.py nemo-manifest $train "$work/train" --min-duration 1 --jobs "$jobs"
  python prepare.py nemo-manifest $dev "$work/dev" --min-duration 1 --jobs "$jobs"
  if [ -n "$noise" ]; then python prepare.py noise "$noise" "$work/noise" --jobs "$jobs"; fi
  done_stage 1 prepare
fi
if run_stage 2 bins; then
  python prepare.py bins "$work/train/cuts.jsonl.gz" --buckets 30 --out "$work/bins.yaml"
  done_stage 2 bins
fi
if run_stage 3 train; then
  n=(); [ -n "$noise" ] && n=(data.noise_cuts="[$work/noise/cuts.jsonl.gz]")
  python train.py --config "$config" data.train_cuts="[$work/train/cuts.jsonl.gz]" \
    data.val_cuts="[$work/dev/cuts.jsonl.gz]" data.bins="$work/bins.yaml" exp_dir="$exp" resume=auto \
    "${n[@]}" "${extra_args[@]}"
  done_stage 3 train
fi
