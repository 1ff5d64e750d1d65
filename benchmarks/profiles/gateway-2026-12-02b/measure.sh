#!/bin/bash
# usage: measure.sh OUTFILE ROUNDS SECONDS "POLICIES" SIDE=PYTHONPATH [SIDE=PYTHONPATH ...]
# starts one embedded gateway per side on core 0, pauses the training job, runs the load on core 1
# alternating sides per policy per round, resumes the training job.
set -u
OUT=$1; ROUNDS=$2; SECS=$3; POLICIES=$4; shift 4
TRAIN=$(pgrep -f "^.venv/bin/python -m training.train" | head -1); echo "training pid: ${TRAIN:-none}" >&2
pause() { if [ -n "$TRAIN" ]; then kill -STOP $TRAIN; fi; }
resume() { if [ -n "$TRAIN" ]; then kill -CONT $TRAIN; fi; }
cd /work/main
declare -A PIDS PORTS
port=${PORT:-18400}
for spec in "$@"; do
  side=${spec%%=*}; rest=${spec#*=}; path=${rest%%|*}; extra=""; [ "$rest" != "$path" ] && extra=${rest#*|}
  (cd $path && exec env PYTHONPATH=$path taskset -c 0 /work/main/.venv/bin/python -m serving --model-repository /work/main/model_repository --backend onnxruntime \
     --workers 2 --intra-op-threads 1 --host 127.0.0.1 --http-port $port --grpc-port $((port+1)) --log-level warning $extra \
     > /tmp/h1/gw-$side.log 2>&1) &
  PIDS[$side]=$!; PORTS[$side]=$port; port=$((port+10))
done
cleanup() { resume; for s in "${!PIDS[@]}"; do kill ${PIDS[$s]} 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT INT TERM
for s in "${!PIDS[@]}"; do
  for i in $(seq 300); do curl -sf http://127.0.0.1:${PORTS[$s]}/v2/health/ready >/dev/null && break; sleep 0.5; done
done
echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) sides: $*" >> $OUT
pause
for r in $(seq $ROUNDS); do
  for pol in $POLICIES; do
    for spec in "$@"; do
      s=${spec%%=*}; p=${PORTS[$s]}
      line=$(PYTHONPATH=. taskset -c 1 .venv/bin/python benchmarks/profiles/gateway_load.py --pid ${PIDS[$s]} \
        --url 127.0.0.1:$((p+1)) --metrics-url http://127.0.0.1:$p/metrics --policy $pol --input fp32 --images test \
        --seconds $SECS --concurrency 16)
      echo "{\"round\": $r, \"side\": \"$s\", ${line#\{}" | tee -a $OUT
    done
  done
done
resume
