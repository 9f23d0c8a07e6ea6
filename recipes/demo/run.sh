#!/usr/bin/env bash
# The demo: synthesize a small corpus and noise set, prepare CutSets and bins, train nest_tiny on CPU.
#   bash recipes/demo/run.sh [--stage N] [--stop-stage N] [--work DIR] [--steps N]
set -euo pipefail
cd "$(dirname "$0")/../.."
work=data/demo
exp=exp/demo
steps=300
extra_args=()
source recipes/stages.sh

if run_stage 0 synth; then
  python prepare.py synth "$work/raw" --num-utterances 240 --num-noises 12
  done_stage 0 synth
fi
if run_stage 1 prepare; then
  python prepare.py audio-dir "$work/raw/speech/train" "$work/train" --min-duration 0.5 --jobs 2
  python prepare.py audio-dir "$work/raw/speech/dev" "$work/dev" --min-duration 0.5
  python prepare.py noise "$work/raw/noise" "$work/noise" --window 10
  done_stage 1 prepare
fi
if run_stage 2 bins; then
  python prepare.py bins "$work/train/cuts.jsonl.gz" --buckets 8 --out "$work/bins.yaml"
  done_stage 2 bins
fi
if run_stage 3 train; then
  python train.py --config configs/nest_tiny.yaml \
    data.train_cuts="[$work/train/cuts.jsonl.gz]" data.val_cuts="[$work/dev/cuts.jsonl.gz]" \
    data.noise_cuts="[$work/noise/cuts.jsonl.gz]" data.bins="$work/bins.yaml" \
    trainer.max_steps="$steps" exp_dir="$exp" trainer.enable_progress_bar=false "${extra_args[@]}"
  done_stage 3 train
fi
if run_stage 4 summary; then
  python -m nest.summary "$exp"
  done_stage 4 summary
fi
