#!/usr/bin/env bash
# HuBERT-style pretraining with k-means targets in the NEST pipeline (same masking, noise, model and loss):
# iteration 1 clusters MFCC frames and trains on their labels; iteration 2 clusters a layer of iteration
# 1's encoder and trains again.
#
#   bash /path/to/nest-ssl/recipes/hubert/run.sh [flags] [key=value ...]
#
# Run it from any folder. By default on the demo corpus (made under WORK by recipes/demo/run.sh stages
# 0-2) with nest_tiny on CPU. For a real corpus give --data with train/cuts.jsonl.gz, dev/cuts.jsonl.gz,
# noise/cuts.jsonl.gz and bins.yaml as prepare.py makes them, --config configs/nest_fast-conformer.yaml,
# --layer 6 and --steps of a real run. key=value arguments go to train.py.
#
# Flags:
#   --data DIR             prepared data (default: WORK/data/demo, made by the demo recipe when missing)
#   --config YAML          training config (default: the repository's configs/nest_tiny.yaml)
#   --steps N              training steps of each iteration (default 300)
#   --clusters1 K          k-means clusters of MFCC frames, iteration 1 (default 100, as HuBERT)
#   --clusters2 K          k-means clusters of encoder features, iteration 2 (default 500, as HuBERT)
#   --layer L              encoder layer clustered in iteration 2, from 0 (default 1: nest_tiny has 2 layers;
#                          HuBERT takes layer 6 of 12)
#   --fraction1 F          share of cuts whose frames the first fit sees (default 0.5; HuBERT: 0.1 of 960 h)
#   --fraction2 F          the same for the second fit (default 1.0)
#   --jobs N               processes computing features and labels (default 2)
#   --seed N               seed of the k-means fits (default 0)
#   --work-dir DIR         where data/ and exp/ go (default: the current folder)
#   --stage N              first stage to run (default 0)
#   --stop-stage N         last stage to run (default 5)
#   --help                 print this text
#
# Stages: 0 data (demo corpus when --data is not given), 1 k-means of MFCC, 2 train iteration 1,
# 3 k-means of the encoder's layer, 4 train iteration 2, 5 summary of both.
# A finished stage is skipped until its flags or inputs change.
set -euo pipefail
data=
config=
steps=300
clusters1=100
clusters2=500
layer=1
fraction1=0.5
fraction2=1.0
jobs=2
seed=0
work_dir=.
stage=0
stop_stage=5
source "$(dirname "${BASH_SOURCE[0]}")/../stages.sh"
config=${config:-$REPO/configs/nest_tiny.yaml}
demo=
[ -n "$data" ] || { data=$work_dir/data/demo; demo=1; }
km=$work_dir/data/hubert
exp=$work_dir/exp/hubert
marker_dir=$km  # this recipe's stage markers, not in the data folder it reads

# labels_per_token of a fit (8 for 10 ms MFCC labels, 1 for encoder features): the decoder's num_books.
books() { python -c "import json, sys; print(json.load(open(sys.argv[1]))['labels_per_token'])" "$1/summary.json"; }

# kmeans ITER [prepare.py kmeans options]: fit on train, label train and dev with it.
kmeans() {
  local it=$1
  shift
  python "$REPO/prepare.py" kmeans "$data/train/cuts.jsonl.gz" "$km/km$it/train" --jobs "$jobs" --seed "$seed" "$@"
  python "$REPO/prepare.py" kmeans "$data/dev/cuts.jsonl.gz" "$km/km$it/dev" --model "$km/km$it/train/kmeans.pt" \
    --jobs "$jobs"
}

# train ITER CLUSTERS: pretrain on the labelled cuts of iteration ITER.
train() {
  python "$REPO/train.py" --config "$config" \
    data.train_cuts="[$km/km$1/train/cuts.jsonl.gz]" data.val_cuts="[$km/km$1/dev/cuts.jsonl.gz]" \
    data.noise_cuts="[$data/noise/cuts.jsonl.gz]" data.bins="$data/bins.yaml" \
    model.targets=kmeans model.quantizer.num_classes="$2" model.quantizer.num_books="$(books "$km/km$1/train")" \
    trainer.max_steps="$steps" exp_dir="$exp/iter$1" resume=auto trainer.enable_progress_bar=false "${extra_args[@]}"
}

if [ -n "$demo" ] && in_range 0 && [ ! -f "$data/train/cuts.jsonl.gz" ]; then
  echo "stage 0: demo data"
  bash "$REPO/recipes/demo/run.sh" --work-dir "$work_dir" --stop-stage 2
fi
if run_stage 1 kmeans-mfcc "clusters=$clusters1" "fraction=$fraction1" "seed=$seed" \
    --in "$data/train/cuts.jsonl.gz" "$data/dev/cuts.jsonl.gz" --out "$km/km1/train/cuts.jsonl.gz" "$km/km1/dev/cuts.jsonl.gz"; then
  kmeans 1 --features mfcc --clusters "$clusters1" --sample-fraction "$fraction1" --config "$config"
  done_stage
fi
if run_stage 2 train-iter1 "steps=$steps" "${extra_args[@]}" --in "$config" "$km/km1" "$data/bins.yaml" \
    --out "$exp/iter1/checkpoints/last.ckpt"; then
  train 1 "$clusters1"
  done_stage
fi
if run_stage 3 kmeans-encoder "clusters=$clusters2" "fraction=$fraction2" "layer=$layer" "seed=$seed" \
    --in "$exp/iter1/checkpoints/last.ckpt" --out "$km/km2/train/cuts.jsonl.gz" "$km/km2/dev/cuts.jsonl.gz"; then
  kmeans 2 --features encoder --checkpoint "$exp/iter1/checkpoints/last.ckpt" --layer "$layer" \
    --clusters "$clusters2" --sample-fraction "$fraction2"
  done_stage
fi
if run_stage 4 train-iter2 "steps=$steps" "${extra_args[@]}" --in "$config" "$km/km2" "$data/bins.yaml" \
    --out "$exp/iter2/checkpoints/last.ckpt"; then
  train 2 "$clusters2"
  done_stage
fi
if in_range 5; then
  python -m nest.summary "$exp/iter1"
  python -m nest.summary "$exp/iter2"
fi
