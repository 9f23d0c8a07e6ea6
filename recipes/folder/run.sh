#!/usr/bin/env bash
# Any audio folder (+ an optional noise folder) -> CutSets -> train/dev split -> bins -> NEST pretraining.
#
#   bash /path/to/nest-ssl/recipes/folder/run.sh --speech-dir DIR [flags] [key=value ...]
#
# Run it from any folder: paths are relative to the current folder, outputs go to WORK/data/folder and
# WORK/exp/folder_nest (WORK: --work-dir). key=value arguments go to train.py (e.g. trainer.devices=8).
#
# Flags:
#   --speech-dir DIR       folder tree of audio files to pretrain on (required)
#   --noise-dir DIR        folder of noise recordings for augmentation (default: none, no noise)
#   --dev-fraction F       share of recordings held out for validation (default 0.01; at least 1 recording,
#                          at most half)
#   --window S             recordings longer than this are cut into S-second windows (default 30)
#   --min-duration S       shorter files (and window tails) are left out (default 1)
#   --buckets N            at most N duration buckets (default 30; fewer when the data is small: each holds
#                          at least 4 batches of data.batch_duration)
#   --config YAML          training config (default: the repository's configs/nest_fast-conformer.yaml)
#   --jobs N               processes checking audio (default: all cores)
#   --seed N               seed of the shuffle and of the dev choice (default 0)
#   --work-dir DIR         where data/ and exp/ go (default: the current folder)
#   --exp-dir DIR          the training run's folder (default: WORK/exp/folder_nest)
#   --stage N              first stage to run (default 1)
#   --stop-stage N         last stage to run (default 5)
#   --help                 print this text
#
# Stages: 1 prepare (audio and noise -> cuts), 2 split (train/dev), 3 bins, 4 train (resume=auto), 5 summary.
# A finished stage is skipped until its flags or inputs change.
set -euo pipefail
speech_dir=
noise_dir=
dev_fraction=0.01
window=30
min_duration=1
buckets=30
config=
jobs=$(nproc)
seed=0
work_dir=.
exp_dir=
stage=1
stop_stage=5
source "$(dirname "${BASH_SOURCE[0]}")/../stages.sh"
[ -n "$speech_dir" ] || { echo "error: give --speech-dir (see --help)" >&2; exit 2; }
for d in "$speech_dir" ${noise_dir:+"$noise_dir"}; do  # before an hour of preparing the speech finds a mistyped noise folder
  [ -e "$d" ] || { echo "error: $d does not exist (--speech-dir / --noise-dir)" >&2; exit 2; }
done
config=${config:-$REPO/configs/nest_fast-conformer.yaml}
data=$work_dir/data/folder
exp=${exp_dir:-$work_dir/exp/folder_nest}

if run_stage 1 prepare "window=$window" "min_duration=$min_duration" "seed=$seed" \
    --in "$speech_dir" "$noise_dir" --out "$data/all/cuts.jsonl.gz"; then
  python "$REPO/prepare.py" audio-dir "$speech_dir" "$data/all" --window "$window" --min-duration "$min_duration" \
    --jobs "$jobs" --seed "$seed"
  if [ -n "$noise_dir" ]; then
    python "$REPO/prepare.py" noise "$noise_dir" "$data/noise" --jobs "$jobs" --seed "$seed"
  fi
  done_stage
fi
if run_stage 2 split "dev_fraction=$dev_fraction" "seed=$seed" --in "$data/all/cuts.jsonl.gz" \
    --out "$data/train.jsonl.gz" "$data/dev.jsonl.gz"; then
  python "$REPO/prepare.py" split "$data/all/cuts.jsonl.gz" "$data" --dev-fraction "$dev_fraction" --seed "$seed"
  done_stage
fi
bins_train_summary "$data/train.jsonl.gz" "$data/dev.jsonl.gz" "${noise_dir:+$data/noise/cuts.jsonl.gz}"
