#!/usr/bin/env bash
# HuBERT-style pretraining with k-means targets in the NEST pipeline (same masking, noise, model and loss):
#   iteration 1: k-means (100 clusters) of MFCC -> train; iteration 2: k-means (500 clusters) of a layer of
#   iteration 1's encoder -> train.
#   bash recipes/hubert/run.sh [--stage N] [--stop-stage N] [--data DIR] [--layer L] [--steps N] [key=value ...]
# By default on the demo corpus (made by recipes/demo/run.sh stages 0-2) with nest_tiny on CPU. For a real
# corpus: --data with train/ dev/ noise/ bins.yaml as prepare.py makes them, --config configs/nest_fast-conformer.yaml,
# --layer 6 (layers count from 0, the first Conformer block's output, as in nest.extract). key=value go to train.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
data=data/demo          # train/ dev/ noise/ cuts and bins.yaml
work=data/hubert        # k-means fits and labelled cuts
exp=exp/hubert
config=configs/nest_tiny.yaml
steps=300
clusters1=100
clusters2=500
layer=1                 # nest_tiny has 2 layers (0, 1); HuBERT takes layer 6 of a 12-layer model
fraction1=0.5           # share of the cuts whose frames the fit sees (HuBERT: 0.1 of 960 h; the demo is small)
fraction2=1.0
jobs=2
extra_args=()
source recipes/stages.sh

# labels_per_token of a fit (8 for 10 ms MFCC labels, 1 for encoder features): the decoder's num_books.
books() { python -c "import json, sys; print(json.load(open(sys.argv[1]))['labels_per_token'])" "$1/summary.json"; }

# train ITER CLUSTERS: pretrain on the labelled cuts of iteration ITER.
train() {
  python train.py --config "$config" \
    data.train_cuts="[$work/km$1/train/cuts.jsonl.gz]" data.val_cuts="[$work/km$1/dev/cuts.jsonl.gz]" \
    data.noise_cuts="[$data/noise/cuts.jsonl.gz]" data.bins="$data/bins.yaml" \
    model.targets=kmeans model.quantizer.num_classes="$2" model.quantizer.num_books="$(books "$work/km$1/train")" \
    trainer.max_steps="$steps" exp_dir="$exp/iter$1" trainer.enable_progress_bar=false "${extra_args[@]}"
}

if run_stage 0 data; then
  [ -f "$data/train/cuts.jsonl.gz" ] || bash recipes/demo/run.sh --work "$data" --stop-stage 2
  done_stage 0 data
fi
if run_stage 1 kmeans-mfcc; then
  python -m nest.kmeans "$data/train/cuts.jsonl.gz" "$work/km1/train" --features mfcc --clusters "$clusters1" \
    --sample-fraction "$fraction1" --jobs "$jobs"
  python -m nest.kmeans "$data/dev/cuts.jsonl.gz" "$work/km1/dev" --model "$work/km1/train/kmeans.pt" --jobs "$jobs"
  done_stage 1 kmeans-mfcc
fi
if run_stage 2 train-iter1; then
  train 1 "$clusters1"
  done_stage 2 train-iter1
fi
if run_stage 3 kmeans-encoder; then
  python -m nest.kmeans "$data/train/cuts.jsonl.gz" "$work/km2/train" --features encoder \
    --checkpoint "$exp/iter1/checkpoints/last.ckpt" --layer "$layer" --clusters "$clusters2" \
    --sample-fraction "$fraction2" --jobs "$jobs"
  python -m nest.kmeans "$data/dev/cuts.jsonl.gz" "$work/km2/dev" --model "$work/km2/train/kmeans.pt" --jobs "$jobs"
  done_stage 3 kmeans-encoder
fi
if run_stage 4 train-iter2; then
  train 2 "$clusters2"
  done_stage 4 train-iter2
fi
if run_stage 5 summary; then
  python -m nest.summary "$exp/iter1"
  python -m nest.summary "$exp/iter2"
  done_stage 5 summary
fi
