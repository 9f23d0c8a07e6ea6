# Shared by the recipes (sourced, not run): flags, --help, and numbered stages with .done markers.
#
# A recipe documents each flag in its header as `#   --name VALUE  meaning`, sets its default in a
# variable (`name` with - as _), then sources this file with its arguments. Documented flags are
# accepted as `--name value` or `--name=value`; any other --flag is an error; `key=value` arguments
# are collected in `extra_args` (they go to train.py). `--help` prints the header.
#
# Stages: `if run_stage N NAME [VALUE ...] [--in PATH ...] [--out PATH ...]; then ...; done_stage; fi`.
# A stage is skipped when its marker `$marker_dir/.done.N.NAME` (default `$data`) holds the same fingerprint (the VALUEs,
# usually the flags it uses, and the names, sizes and modification times of the files under each
# input PATH) and every output PATH exists; otherwise it runs (again), saying what changed.
# Paths are the caller's: recipes never cd, and call the repository's scripts by absolute path.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # for python -m nest.summary from any folder
recipe_script=${BASH_SOURCE[1]}

recipe_help() { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$recipe_script"; }
known_flags=$(grep -oE '^#   --[a-z][a-z0-9-]*' "$recipe_script" | sed 's/^#   //')
extra_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) recipe_help; exit 0 ;;
    --*)
      flag=${1%%=*}
      if ! grep -qxF -- "$flag" <<<"$known_flags"; then
        echo "error: unknown flag $flag; the flags of $recipe_script are: $(echo $known_flags) (see --help)" >&2
        exit 2
      fi
      if [[ "$1" == *=* ]]; then value=${1#*=}; shift
      elif [ $# -ge 2 ]; then value=$2; shift 2
      else echo "error: $flag needs a value (see --help)" >&2; exit 2
      fi
      var=${flag#--}
      printf -v "${var//-/_}" '%s' "$value"
      ;;
    *=*) extra_args+=("$1"); shift ;;
    *) echo "error: unexpected argument '$1': give --flag value, or key=value for train.py (see --help)" >&2; exit 2 ;;
  esac
done
for v in stage stop_stage; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "error: --${v//_/-} must be a stage number, not '${!v}'" >&2; exit 2; }
done
# The project's Python: $PYTHON, else `python` on PATH when it has the packages, else the repository's .venv.
nest_python=${PYTHON:-python}
if ! "$nest_python" -c "import lhotse, pytorch_lightning, nest" >/dev/null 2>&1; then
  if [ -z "${PYTHON:-}" ] && [ -x "$REPO/.venv/bin/python" ]; then
    nest_python=$REPO/.venv/bin/python
  else
    echo "error: ${PYTHON:-python} cannot import this project: run \`make install\` in $REPO and" \
         "\`source $REPO/.venv/bin/activate\`, or set PYTHON=/path/to/python" >&2
    exit 2
  fi
fi
python() { command "$nest_python" "$@"; }  # `command`: not this function again
mkdir -p "$work_dir"
work_dir=$(cd "$work_dir" && pwd)  # absolute: the paths end up in exp_dir/config.yaml

# fingerprint [VALUE ...] [--in PATH ...] [--out PATH ...]: one line per value and per input.
fingerprint() {
  local mode=value a
  for a in "$@"; do
    case "$a" in
      --in) mode=input; continue ;;
      --out) mode=output; continue ;;
    esac
    case $mode in
      value) printf 'flag %s\n' "$a" ;;
      input)
        [ -n "$a" ] || continue
        if [ -e "$a" ]; then
          printf 'input %s %s\n' "$a" "$(find -L "$a" -type f -printf '%P %s %T@\n' | LC_ALL=C sort | md5sum | cut -c1-32)"
        else
          printf 'input %s missing\n' "$a"
        fi ;;
    esac
  done
}

# outputs_missing [VALUE ...] [--in PATH ...] [--out PATH ...]: the --out paths that do not exist.
outputs_missing() {
  local mode=value a
  for a in "$@"; do
    case "$a" in --in) mode=input ;; --out) mode=output ;; *) [ $mode = output ] && [ ! -e "$a" ] && echo "$a" ;; esac
  done
  return 0
}

in_range() { [ "$1" -ge "$stage" ] && [ "$1" -le "$stop_stage" ]; }

run_stage() {
  local n=$1 name=$2 missing
  shift 2
  in_range "$n" || return 1
  stage_args=("$@")
  stage_marker="${marker_dir:-$data}/.done.$n.$name"
  if [ -f "$stage_marker" ]; then
    missing=$(outputs_missing "$@")
    if [ -z "$missing" ] && [ "$(cat "$stage_marker")" = "$(fingerprint "$@")" ]; then
      echo "stage $n ($name): done already with these flags and inputs, skipping"
      return 1
    fi
    echo "stage $n ($name): its flags, inputs or outputs changed since it was done; running it again:"
    diff <(cat "$stage_marker") <(fingerprint "$@") | sed -n 's/^</  was:/p; s/^>/  now:/p'
    for m in $missing; do echo "  missing output: $m"; done
    rm -f "$stage_marker"
  fi
  echo "stage $n: $name"
}

done_stage() { mkdir -p "$(dirname "$stage_marker")"; fingerprint "${stage_args[@]}" > "$stage_marker"; }

# has_cuts MANIFEST: true when the (gzipped) manifest holds at least one line.
has_cuts() { [ -n "$(gzip -cdf "$1" 2>/dev/null | head -c 1)" ]; }

# bins_train_summary TRAIN DEV NOISE: the stages every corpus recipe ends with, 3 bins (--buckets; buckets that each
# hold several batches of the config's data.batch_duration, key=value arguments included), 4 train (resume=auto,
# key=value arguments passed on) and 5 the summary line. DEV and NOISE may be empty; a DEV manifest without cuts is
# left out of training.
bins_train_summary() {
  local train=$1 dev=$2 noise=$3
  if run_stage 3 bins "buckets=$buckets" "${extra_args[@]}" --in "$train" "$config" --out "$data/bins.yaml"; then
    python "$REPO/prepare.py" bins "$train" "${extra_args[@]}" --config "$config" --buckets "$buckets" \
      --out "$data/bins.yaml"
    done_stage
  fi
  if run_stage 4 train "exp=$exp" "${extra_args[@]}" --in "$config" "$train" ${dev:+"$dev"} "$data/bins.yaml" \
      ${noise:+"$noise"} --out "$exp/checkpoints/last.ckpt"; then
    local sets=(data.train_cuts="[$train]")
    if [ -n "$dev" ] && has_cuts "$dev"; then sets+=(data.val_cuts="[$dev]"); fi
    if [ -n "$noise" ]; then sets+=(data.noise_cuts="[$noise]"); fi
    python "$REPO/train.py" --config "$config" "${sets[@]}" data.bins="$data/bins.yaml" exp_dir="$exp" resume=auto \
      "${extra_args[@]}"
    done_stage
  fi
  if in_range 5; then
    python -m nest.summary "$exp"
  fi
}
