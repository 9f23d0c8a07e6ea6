#!/usr/bin/env bash
# LibriSpeech + MUSAN noise -> CutSets (shuffled across parts) -> bins -> NEST pretraining.
#
#   bash /path/to/nest-ssl/recipes/librispeech/run.sh --corpus-dir DIR --musan-dir DIR [flags] [key=value ...]
#
# Run it from any folder: paths are relative to the current folder, outputs go to WORK/data/librispeech and
# WORK/exp/librispeech_nest (WORK: --work-dir). key=value arguments go to train.py.
#
# Flags:
#   --corpus-dir DIR       the LibriSpeech folder (holding train-clean-100/ ...) (default /data/LibriSpeech)
#   --musan-dir DIR        the MUSAN folder (holding noise/ music/ speech/) (default /data/musan)
#   --download BOOL        true: download both corpora first, next to those folders (default false)
#   --train-parts "P ..."  training parts (default "train-clean-100 train-clean-360 train-other-500")
#   --dev-parts "P ..."    validation parts (default "dev-clean dev-other")
#   --buckets N            at most N duration buckets (default 30; fewer when the data is small: each holds
#                          at least 4 batches of data.batch_duration)
#   --config YAML          training config (default: the repository's configs/nest_fast-conformer.yaml)
#   --jobs N               processes checking audio (default: all cores)
#   --seed N               seed of the shuffle (default 0)
#   --work-dir DIR         where data/ and exp/ go (default: the current folder)
#   --exp-dir DIR          the training run's folder (default: WORK/exp/librispeech_nest)
#   --stage N              first stage to run (default 1)
#   --stop-stage N         last stage to run (default 5)
#   --help                 print this text
#
# Stages: 1 prepare LibriSpeech, 2 prepare MUSAN (noise and music in 10 s windows, as icefall), 3 bins,
# 4 train (resume=auto), 5 summary. A finished stage is skipped until its flags or inputs change.
set -euo pipefail
corpus_dir=/data/LibriSpeech
musan_dir=/data/musan
download=false
train_parts="train-clean-100 train-clean-360 train-other-500"
dev_parts="dev-clean dev-other"
buckets=30
config=
jobs=$(nproc)
seed=0
work_dir=.
exp_dir=
stage=1
stop_stage=5
source "$(dirname "${BASH_SOURCE[0]}")/../stages.sh"
case "$download" in
  true) dl=(--download) ;;
  false) dl=() ;;
  *) echo "error: --download must be true or false, not '$download'" >&2; exit 2 ;;
esac
config=${config:-$REPO/configs/nest_fast-conformer.yaml}
data=$work_dir/data/librispeech
exp=${exp_dir:-$work_dir/exp/librispeech_nest}
read -ra train_list <<<"$train_parts"
read -ra dev_list <<<"$dev_parts"

if run_stage 1 prepare_librispeech "train_parts=$train_parts" "dev_parts=$dev_parts" "seed=$seed" \
    --in "$corpus_dir" --out "$data/train/cuts.jsonl.gz" "$data/dev/cuts.jsonl.gz"; then
  python "$REPO/prepare.py" recipe librispeech "$corpus_dir" "$data/train" --parts "${train_list[@]}" \
    --jobs "$jobs" --seed "$seed" "${dl[@]}"
  python "$REPO/prepare.py" recipe librispeech "$corpus_dir" "$data/dev" --parts "${dev_list[@]}" \
    --jobs "$jobs" --seed "$seed"
  done_stage
fi
if run_stage 2 prepare_musan "seed=$seed" --in "$musan_dir" --out "$data/noise/cuts.jsonl.gz"; then
  # Noise and music as interference, in 10 s windows as icefall does (MUSAN speech is left out).
  python "$REPO/prepare.py" recipe musan "$musan_dir" "$data/noise" --parts noise music --window 10 \
    --jobs "$jobs" --seed "$seed" "${dl[@]}"
  done_stage
fi
bins_train_summary "$data/train/cuts.jsonl.gz" "$data/dev/cuts.jsonl.gz" "$data/noise/cuts.jsonl.gz"
