#!/usr/bin/env bash
# Train a digits classifier while assayer evaluates every checkpoint, then show the results and shut down.
#
# Everything the run creates stays in examples/digits/run/: checkpoints, evaluation files, the plot, the
# worker logs and the private Redis server's data. With REDIS_URL set, the run uses that server instead,
# and the shutdown at the end stops every assayer watch and worker on it.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
run=${DIGITS_RUN_DIR:-$here/run}
epochs=${DIGITS_EPOCHS:-5}
deadline_seconds=${DIGITS_DEADLINE_SECONDS:-120}

rm -rf "$run"
mkdir -p "$run"
export XDG_STATE_HOME="$run/state"
socket_dir=""
if [[ -z "${REDIS_URL:-}" ]]; then
  # A unix socket in a fresh folder: a server of its own that no other run or user can reach.
  socket_dir=$(mktemp -d)
  export REDIS_URL="unix://$socket_dir/redis.sock"
fi

show() {
  printf '\n$ %s\n' "$*"
  "$@"
}

finish() {
  python -m assayer.shutdown --force --stop_redis >/dev/null 2>&1 || true
  if [[ -n "$socket_dir" ]]; then rm -rf "$socket_dir"; fi
}
trap finish EXIT

finished_count() {
  python -m assayer.status --format json | python -c '
import json, sys
print(sum(watch["counts"].get(state, 0) for watch in json.load(sys.stdin) for state in ("finished", "failed", "skipped")))'
}

show python -m assayer.watch --directory "$run/checkpoints" \
  --evaluator "$here/eval.py:eval_from_checkpoint" --polling_interval 1 --num_eval_workers 2
show python "$here/train.py" --checkpoint_dir "$run/checkpoints" --epochs "$epochs" --seconds_per_epoch 1

printf '\nwaiting for %s evaluations' "$epochs"
start=$SECONDS
until [[ $(finished_count) -ge $epochs ]]; do
  if (( SECONDS - start > deadline_seconds )); then
    printf '\nerror: %s evaluations did not finish within %s s; worker logs are in %s\n' \
      "$epochs" "$deadline_seconds" "$XDG_STATE_HOME/assayer/logs" >&2
    exit 1
  fi
  printf '.'
  sleep 1
done
echo

show python -m assayer.status --plot "$run/metrics.png"
show python -m assayer.shutdown --stop_redis
printf '\nevaluation files: %s\n' "$run/evals"
