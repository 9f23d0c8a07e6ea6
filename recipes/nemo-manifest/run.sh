#!/usr/bin/env bash
# NeMo JSON-lines manifests (as NeMo and nest_ssl_project use) -> CutSets -> bins -> NEST pretraining.
#
#   bash /path/to/nest-ssl/recipes/nemo-manifest/run.sh --train "a.json b.json" [--dev dev.json] [flags] [key=value ...]
#
# Run it from any folder: paths are relative to the current folder (audio paths inside a manifest are
# relative to that manifest's folder), outputs go to WORK/data/nemo_manifest and WORK/exp/nemo_manifest_nest
# (WORK: --work-dir). key=value arguments go to train.py.
#
# Flags:
#   --train "A.json ..."   training manifests, space-separated (required)
#   --dev "A.json ..."     validation manifests (default: none, --dev-fraction of the training recordings)
#   --dev-fraction F       without --dev: share of recordings held out (default 0.01; at least 1, at most half)
#   --noise "A.json ..."   noise manifests for augmentation (default: none, no noise)
#   --min-duration S       shorter segments are left out (default 1)
#   --buckets N            at most N duration buckets (default 30; fewer when the data is small: each holds
#                          at least 4 batches of data.batch_duration)
#   --config YAML          training config (default: the repository's configs/nest_fast-conformer.yaml)
#   --jobs N               processes checking audio (default: all cores)
#   --seed N               seed of the shuffle and of the dev choice (default 0)
#   --work-dir DIR         where data/ and exp/ go (default: the current folder)
#   --exp-dir DIR          the training run's folder (default: WORK/exp/nemo_manifest_nest)
#   --stage N              first stage to run (default 1)
#   --stop-stage N         last stage to run (default 5)
#   --help                 print this text
#
# Stages: 1 prepare, 2 split (only without --dev), 3 bins, 4 train (resume=auto), 5 summary.
# A finished stage is skipped until its flags or inputs change.
set -euo pipefail
train=
dev=
dev_fraction=0.01
noise=
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
[ -n "$train" ] || { echo "error: give --train manifests (see --help)" >&2; exit 2; }
config=${config:-$REPO/configs/nest_fast-conformer.yaml}
data=$work_dir/data/nemo_manifest
exp=${exp_dir:-$work_dir/exp/nemo_manifest_nest}
read -ra train_list <<<"$train"
read -ra dev_list <<<"$dev"
read -ra noise_list <<<"$noise"
if [ -n "$dev" ]; then
  train_cuts=$data/all/cuts.jsonl.gz dev_cuts=$data/dev/cuts.jsonl.gz
else
  train_cuts=$data/train.jsonl.gz dev_cuts=$data/dev.jsonl.gz
fi

if run_stage 1 prepare "min_duration=$min_duration" "seed=$seed" \
    --in "${train_list[@]}" "${dev_list[@]}" "${noise_list[@]}" --out "$data/all/cuts.jsonl.gz" \
    ${dev:+"$dev_cuts"} ${noise:+"$data/noise/cuts.jsonl.gz"}; then
  python "$REPO/prepare.py" nemo-manifest "${train_list[@]}" "$data/all" --min-duration "$min_duration" \
    --jobs "$jobs" --seed "$seed"
  if [ -n "$dev" ]; then
    python "$REPO/prepare.py" nemo-manifest "${dev_list[@]}" "$data/dev" --min-duration "$min_duration" \
      --jobs "$jobs" --seed "$seed"
  fi
  if [ -n "$noise" ]; then
    python "$REPO/prepare.py" noise "${noise_list[@]}" "$data/noise" --jobs "$jobs" --seed "$seed"
  fi
  done_stage
fi
if [ -z "$dev" ] && run_stage 2 split "dev_fraction=$dev_fraction" "seed=$seed" --in "$data/all/cuts.jsonl.gz" \
    --out "$train_cuts" "$dev_cuts"; then
  python "$REPO/prepare.py" split "$data/all/cuts.jsonl.gz" "$data" --dev-fraction "$dev_fraction" --seed "$seed"
  done_stage
fi
bins_train_summary "$train_cuts" "$dev_cuts" "${noise:+$data/noise/cuts.jsonl.gz}"
