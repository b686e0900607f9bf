#!/bin/bash
# Time the offline demo build (recipes/demo.yaml) of two commits side by side, alternating A B A B ...
# Usage: benchmarks/demo_time.sh BASE_COMMIT NEW_COMMIT [ROUNDS]   (run with nothing else on the machine)
# Each commit is checked out into a temporary git worktree and run with this repo's .venv.
set -euo pipefail
repo=$(git rev-parse --show-toplevel)
base=$1; new=$2; rounds=${3:-2}
tmp=$(mktemp -d /tmp/fillup-demo-time.XXXX)
git -C "$repo" worktree add -q --detach "$tmp/a" "$base"
git -C "$repo" worktree add -q --detach "$tmp/b" "$new"
trap 'git -C "$repo" worktree remove --force "$tmp/a"; git -C "$repo" worktree remove --force "$tmp/b"; rm -rf "$tmp"' EXIT
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, python $("$repo/.venv/bin/python" -c 'import sys; print(sys.version.split()[0])')"
for ((r = 1; r <= rounds; r++)); do
  for side in a b; do
    rm -rf "$tmp/out-$side"
    s=$(date +%s.%N)
    (cd "$tmp/$side" && PYTHONPATH="$tmp/$side" "$repo/.venv/bin/python" -m fillup_data.cli build recipes/demo.yaml \
      --out "$tmp/out-$side" --quiet > "$tmp/log-$side" 2>&1)
    e=$(date +%s.%N)
    echo "round $r $(git -C "$tmp/$side" rev-parse --short HEAD) $(echo "$e - $s" | bc) s (load $(cut -d' ' -f1 /proc/loadavg))"
  done
done
