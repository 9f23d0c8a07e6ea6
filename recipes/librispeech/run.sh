#!/usr/bin/env bash
# LibriSpeech + MUSAN noise -> bins -> NEST pretraining.
#   bash recipes/librispeech/run.sh --corpus-dir /data/LibriSpeech --musan-dir /data/musan [--download true]
#       [--train-parts "train-clean-100 train-clean-360 train-other-500"] [--config configs/nest_fast-conformer.yaml]
#       [--stage N] [--stop-stage N] [key=value ...]   (key=value go to train.py)
set -euo pipefail
cd "$(dirname "$0")/../.."
corpus_dir=/data/LibriSpeech
musan_dir=/data/musan
download=false
train_parts="train-clean-100 train-clean-360 train-other-500"
dev_parts="dev-clean dev-other"
config=configs/nest_fast-conformer.yaml
jobs=$(nproc)
work=data/librispeech
exp=exp/librispeech_nest
extra_args=()
source recipes/stages.sh
dl=(); [ "$download" = true ] && dl=(--download)

if run_stage 1 prepare_librispeech; then
  python prepare.py recipe librispeech "$corpus_dir" "$work/train" --parts $train_parts --jobs "$jobs" "${dl[@]}"
  python prepare.py recipe librispeech "$corpus_dir" "$work/dev" --parts $dev_parts --jobs "$jobs"
  done_stage 1 prepare_librispeech
fi
if run_stage 2 prepare_musan; then
  # Noise and music as interference, in 10 s windows as icefall does (MUSAN speech is left out).
  python prepare.py recipe musan "$musan_dir" "$work/noise" --parts noise music --window 10 --jobs "$jobs" "${dl[@]}"
  done_stage 2 prepare_musan
fi
if run_stage 3 bins; then
  python prepare.py bins "$work/train/cuts.jsonl.gz" --buckets 30 --out "$work/bins.yaml"
  done_stage 3 bins
fi
if run_stage 4 train; then
  python train.py --config "$config" \
    data.train_cuts="[$work/train/cuts.jsonl.gz]" data.val_cuts="[$work/dev/cuts.jsonl.gz]" \
    data.noise_cuts="[$work/noise/cuts.jsonl.gz]" data.bins="$work/bins.yaml" exp_dir="$exp" resume=auto \
    "${extra_args[@]}"
  done_stage 4 train
fi
