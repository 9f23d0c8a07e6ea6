#!/usr/bin/env bash
# The demo: synthesize a small corpus and noise set, prepare CutSets and bins, train nest_tiny on CPU.
#
#   bash /path/to/nest-ssl/recipes/demo/run.sh [flags] [key=value ...]     (make demo runs it)
#
# Run it from any folder: outputs go to WORK/data/demo and WORK/exp/demo (WORK: --work-dir).
# key=value arguments go to train.py.
#
# Flags:
#   --steps N              training steps (default 300)
#   --config YAML          training config (default: the repository's configs/nest_tiny.yaml)
#   --seed N               seed of the synthetic corpus and of the shuffle (default 0)
#   --work-dir DIR         where data/ and exp/ go (default: the current folder)
#   --stage N              first stage to run (default 0)
#   --stop-stage N         last stage to run (default 4)
#   --help                 print this text
#
# Stages: 0 synth, 1 prepare, 2 bins, 3 train (resume=auto), 4 summary.
# A finished stage is skipped until its flags or inputs change.
set -euo pipefail
steps=300
config=
seed=0
work_dir=.
stage=0
stop_stage=4
source "$(dirname "${BASH_SOURCE[0]}")/../stages.sh"
config=${config:-$REPO/configs/nest_tiny.yaml}
data=$work_dir/data/demo
exp=$work_dir/exp/demo

if run_stage 0 synth "seed=$seed" --out "$data/raw/speech/train" "$data/raw/noise"; then
  python "$REPO/prepare.py" synth "$data/raw" --num-utterances 240 --num-noises 12 --seed "$seed"
  done_stage
fi
if run_stage 1 prepare "seed=$seed" --in "$data/raw" --out "$data/train/cuts.jsonl.gz" "$data/dev/cuts.jsonl.gz" \
    "$data/noise/cuts.jsonl.gz"; then
  python "$REPO/prepare.py" audio-dir "$data/raw/speech/train" "$data/train" --min-duration 0.5 --jobs 2 --seed "$seed"
  python "$REPO/prepare.py" audio-dir "$data/raw/speech/dev" "$data/dev" --min-duration 0.5 --seed "$seed"
  python "$REPO/prepare.py" noise "$data/raw/noise" "$data/noise" --window 10 --seed "$seed"
  done_stage
fi
if run_stage 2 bins "${extra_args[@]}" --in "$data/train/cuts.jsonl.gz" "$config" --out "$data/bins.yaml"; then
  python "$REPO/prepare.py" bins "$data/train/cuts.jsonl.gz" "${extra_args[@]}" --config "$config" --buckets 8 \
    --out "$data/bins.yaml"
  done_stage
fi
if run_stage 3 train "steps=$steps" "${extra_args[@]}" --in "$config" "$data/train/cuts.jsonl.gz" \
    "$data/dev/cuts.jsonl.gz" "$data/noise/cuts.jsonl.gz" "$data/bins.yaml" --out "$exp/checkpoints/last.ckpt"; then
  python "$REPO/train.py" --config "$config" \
    data.train_cuts="[$data/train/cuts.jsonl.gz]" data.val_cuts="[$data/dev/cuts.jsonl.gz]" \
    data.noise_cuts="[$data/noise/cuts.jsonl.gz]" data.bins="$data/bins.yaml" \
    trainer.max_steps="$steps" exp_dir="$exp" resume=auto trainer.enable_progress_bar=false "${extra_args[@]}"
  done_stage
fi
if in_range 4; then
  python -m nest.summary "$exp"
fi
