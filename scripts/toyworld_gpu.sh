#!/usr/bin/env bash
# Train toyworld on one GPU machine (issue 14) in one sitting: the world classifier, then generator
# variants side by side (models this small leave a GPU mostly idle, so three processes share one),
# each exported and measured there. Everything worth keeping is written to OUT as it is made, so a
# run stopped at its time limit still hands back what finished.
#
#   scripts/toyworld_gpu.sh OUT TRAIN_SECONDS [DEADLINE_SECONDS]
#
# DEADLINE_SECONDS (default 570, for a 600-second call): every stage after the probe is cut to end by
# then; a generator stopped early is still exported (its fillup_toyworld.json says at which step).
#
# The step count is chosen once, from a 300-step probe of all variants running together: the largest
# multiple of 1000 that fits TRAIN_SECONDS at the slowest variant's rate. It is printed and recorded
# in each exported folder's fillup_toyworld.json ("reproduce"), which is the command that trains the
# same generator again on any machine (`--device cuda` changes float sums, not the data stream).
set -uo pipefail
out=${1:?OUT}; budget=${2:?TRAIN_SECONDS}; end=$(( $(date +%s) + ${3:-570} ))
left() { echo $(( end - $(date +%s) )); }
W=build/gpu
L=$W/logs  # logs stay here and travel as one logs.tar.gz (a call hands back at most 8 files)
mkdir -p "$W" "$L" "$out"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
py=${PY:-python3}
# smaller for a dry run on a CPU: DEVICE=cpu PROBE=40 UNIT=20 CLS_STEPS=20 MEASURE=classifier
DEVICE=${DEVICE:-cuda} PROBE=${PROBE:-300} UNIT=${UNIT:-1000} CLS_STEPS=${CLS_STEPS:-1200} MEASURE=${MEASURE:-checks words}
log() { echo "[$(date +%T)] $*" | tee -a "$L/driver.log"; tar -C "$W" -czf "$out/logs.tar.gz" logs; }
# NAME:TRAINING-ARGS, separated by ";" (VARIANTS=... overrides); each spells out batch and hard share, whose
# defaults have changed. The default is the second sitting's (the shipped weights); the first sitting trained
#   "base-hard:--unet base --batch-size 64 --hard-fraction 0.3;large-hard:--unet large --batch-size 64
#    --hard-fraction 0.3;large-plain:--unet large --batch-size 64 --hard-fraction 0"
# (results/toyworld_training/README.md)
VARIANTS_DEFAULT="b128-plain:--unet large --batch-size 128 --hard-fraction 0;b128-mix15:--unet large --batch-size 128 --hard-fraction 0.15;b128-mix30:--unet large --batch-size 128 --hard-fraction 0.3"
IFS=';' read -ra VARIANTS <<< "${VARIANTS:-$VARIANTS_DEFAULT}"
WORKERS=${WORKERS:-4}
gen() {  # gen NAME WORK STEPS ARGS...
    local name=$1 work=$2 steps=$3; shift 3
    $py scripts/train_toyworld.py generator --work "$work" --autoencoder exact --steps "$steps" --device $DEVICE \
        --data-workers $WORKERS "$@" > "$L/$name.log" 2>&1
}
log "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader); torch $($py -c 'import torch;print(torch.__version__)')"
classifier=$out/world_classifier.safetensors
if [ "$CLS_STEPS" = 0 ]; then  # keep the shipped world classifier (it measures the variants below)
    classifier=fillup_data/demo/toyworld/world_classifier.safetensors; true & cls=$!
else
    $py scripts/train_toyworld.py classifier --device $DEVICE --data-workers 2 --classifier-steps $CLS_STEPS --classifier-out "$classifier" \
        > "$L/classifier.log" 2>&1 &
    cls=$!
fi
t0=$(date +%s)
for v in "${VARIANTS[@]}"; do gen "probe-${v%%:*}" "$W/probe-${v%%:*}" $PROBE ${v#*:} & done
wait $(jobs -p | grep -v "^$cls$")
rate=$($py - "$W" $PROBE <<'EOF'
import json, sys, pathlib
rates, last = [], int(sys.argv[2])
first = last // 3 // 20 * 20  # past the start-up (CUDA context, first kernels, workers' first batches)
for d in pathlib.Path(sys.argv[1]).glob("probe-*"):
    log = {e["step"]: e["elapsed_s"] for e in json.loads((d / "generator" / "state.json").read_text())["log"]}
    rates.append((last - first) / (log[last] - log[first]))
    print(d.name, f"{rates[-1]:.1f} steps/s", file=sys.stderr)
print(min(rates))
EOF
)
[ -n "$rate" ] || { log "the probe failed: see logs/probe-*.log"; exit 1; }
steps=$($py -c "print(max($UNIT, int($rate * $budget) // $UNIT * $UNIT))")
log "probe took $(( $(date +%s) - t0 )) s; slowest ${rate} steps/s -> $steps steps each"
wait $cls && [ "$CLS_STEPS" != 0 ] && log "classifier: $(tail -c 300 "$L/classifier.log" | tr '\r' '\n' | tail -1)"
t0=$(date +%s)
for v in "${VARIANTS[@]}"; do
    name=${v%%:*}
    tt=$(( $(left) - 120 )); [ $tt -lt $((budget * 3 / 2)) ] || tt=$((budget * 3 / 2))
    ( timeout $tt bash -c "$(declare -f gen); py=$py L=$L DEVICE=$DEVICE WORKERS=$WORKERS; gen $name $W/$name $steps ${v#*:}"; rc=$?
      echo "[$(date +%T)] $name training exit $rc" >> "$L/driver.log"
      $py scripts/train_toyworld.py export --work "$W/$name" --autoencoder exact --out "$W/$name/pipe" >> "$L/$name.log" 2>&1 \
      && cp "$W/$name/generator/state.json" "$W/$name/pipe/train_state.json" \
      && tar -C "$W/$name" -czf "$out/$name.tar.gz" pipe && echo "[$(date +%T)] $name exported" >> "$L/driver.log" ) &
done
wait
log "training + export took $(( $(date +%s) - t0 )) s"
for v in "${VARIANTS[@]}"; do
    name=${v%%:*}
    [ -f "$out/$name.tar.gz" ] || continue
    timeout $(( $(left) - 15 )) $py scripts/train_toyworld.py measure --parts $MEASURE --device $DEVICE --out "$W/$name/pipe" \
        --classifier-out "$classifier" --work "$W/$name/measure" > "$L/$name-measure.log" 2>&1 &
done
wait
for v in "${VARIANTS[@]}"; do
    name=${v%%:*}; cp "$W/$name/measure/measure.md" "$L/$name-measure.md" 2>/dev/null; cp "$W/$name/measure/measure.json" "$L/$name-measure.json" 2>/dev/null
done
log "done"
