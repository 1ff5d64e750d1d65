#!/bin/bash
# usage: measure.sh OUTFILE ROUNDS SECONDS
# Two embedded gateways on core 0 (the reference repository and the composed one), the load on core 1:
# per round, early and full on each, c=16, one FP32 test image a gRPC request (benchmarks/profiles/gateway_load.py).
set -u
OUT=$1; ROUNDS=$2; SECS=$3
cd /work/main
declare -A REPO=([reference]=model_repository [composed]=/work/scratch/composed) MODEL=([reference]=mwresnet56_5 [composed]=r20_r56) PORT=([reference]=18600 [composed]=18610) PID
for s in reference composed; do
  taskset -c 0 .venv/bin/python -m serving --model-repository ${REPO[$s]} --backend onnxruntime --workers 2 \
    --host 127.0.0.1 --http-port ${PORT[$s]} --grpc-port $((PORT[$s]+1)) --log-level warning > /tmp/gw-$s.log 2>&1 &
  PID[$s]=$!
done
trap 'kill ${PID[reference]} ${PID[composed]} 2>/dev/null; wait 2>/dev/null' EXIT
for s in reference composed; do
  for i in $(seq 300); do curl -sf http://127.0.0.1:${PORT[$s]}/v2/health/ready >/dev/null && break; sleep 0.5; done
done
echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD)" >> $OUT
for r in $(seq $ROUNDS); do
  for pol in early full; do
    for s in reference composed; do
      p=${PORT[$s]}
      line=$(PYTHONPATH=. taskset -c 1 .venv/bin/python benchmarks/profiles/gateway_load.py --pid ${PID[$s]} \
        --url 127.0.0.1:$((p+1)) --metrics-url http://127.0.0.1:$p/metrics --model ${MODEL[$s]} \
        --repository ${REPO[$s]} --policy $pol --input fp32 --images test --seconds $SECS --concurrency 16)
      echo "{\"round\": $r, \"side\": \"$s\", ${line#\{}" | tee -a $OUT
    done
  done
done
