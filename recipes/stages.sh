# Shared by the recipes: --stage/--stop-stage parsing and .done markers (sourced, not run).
# A recipe sets its defaults, sources this file, then wraps each stage in `if run_stage N name; then ... ; done_stage N name; fi`.
stage=${stage:-0}
stop_stage=${stop_stage:-100}
while [ $# -gt 0 ]; do
  case "$1" in
    --stage) stage=$2; shift 2 ;;
    --stop-stage) stop_stage=$2; shift 2 ;;
    --*=*) k=${1%%=*}; k=${k#--}; declare "${k//-/_}=${1#*=}"; shift ;;
    --*) k=${1#--}; declare "${k//-/_}=$2"; shift 2 ;;
    *) extra_args+=("$1"); shift ;;
  esac
done

# run_stage N NAME: true when stage N is in range and has no .done marker in $work.
run_stage() {
  [ "$1" -ge "$stage" ] && [ "$1" -le "$stop_stage" ] || return 1
  if [ -f "$work/.done.$1.$2" ]; then echo "stage $1 ($2): done already, skipping"; return 1; fi
  echo "stage $1: $2"
}
done_stage() { mkdir -p "$work"; touch "$work/.done.$1.$2"; }
