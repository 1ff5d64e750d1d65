#!/bin/bash
# usage: profile.sh NAME PYTHONPATH POLICY [native]
# one gateway on core 0; training paused; 22 s of load on core 1, py-spy records 10 s in the middle;
# per-thread CPU (utime+stime ticks) over the load window.
set -u
NAME=$1; SIDE=$2; POL=$3; NATIVE=${4:-}
TRAIN=$(pgrep -f "^.venv/bin/python -m training.train" | head -1); echo "training pid: ${TRAIN:-none}" >&2
pause() { if [ -n "$TRAIN" ]; then kill -STOP $TRAIN; fi; }
resume() { if [ -n "$TRAIN" ]; then kill -CONT $TRAIN; fi; }
cd /work/main; port=${PORT:-18500}
(cd $SIDE && exec env PYTHONPATH=$SIDE taskset -c 0 /work/main/.venv/bin/python -m serving --model-repository /work/main/model_repository --backend onnxruntime \
   --workers 2 --intra-op-threads 1 --host 127.0.0.1 --http-port $port --grpc-port $((port+1)) --log-level warning \
   > /tmp/h1/gw-prof.log 2>&1) &
GW=$!
cleanup() { resume; kill $GW 2>/dev/null; wait 2>/dev/null; }
trap cleanup EXIT INT TERM
for i in $(seq 300); do curl -sf http://127.0.0.1:$port/v2/health/ready >/dev/null && break; sleep 0.5; done
threads() { for t in /proc/$GW/task/*; do n=$(cat $t/comm | tr " " _); [ "$(basename $t)" = "$GW" ] && n=MAIN; echo "$(basename $t)_$n $(awk "{print \$14+\$15}" $t/stat)"; done | sort; }
pause
PYTHONPATH=. taskset -c 1 .venv/bin/python benchmarks/profiles/gateway_load.py --pid $GW \
  --url 127.0.0.1:$((port+1)) --metrics-url http://127.0.0.1:$port/metrics --policy $POL --input fp32 --images test \
  --seconds 22 --concurrency 16 > /tmp/h1/prof-$NAME.load.json &
LOAD=$!
sleep 4; threads > /tmp/h1/threads-a
if [ "$NATIVE" = nospy ]; then sleep 10; elif [ "$NATIVE" = perf ]; then perf record -e cpu-clock -F 499 -g -p $GW -o /tmp/h1/perf-$NAME.data -- sleep 10 >/dev/null 2>&1; else taskset -c 1 .venv/bin/py-spy record -p $GW -f raw -r 200 -d 10 ${NATIVE:+--native} -o /tmp/h1/pyspy-$NAME.txt >/dev/null 2>&1; fi
sleep 2; threads > /tmp/h1/threads-b
wait $LOAD
resume
cat /tmp/h1/prof-$NAME.load.json
join /tmp/h1/threads-a /tmp/h1/threads-b | awk '{sub(/^[0-9]+_/, "", $1); print $1, $3-$2}' | awk '{a[$1]+=$2} END {for (k in a) print k, a[k]}' > /tmp/h1/threads-$NAME.txt
cat /tmp/h1/threads-$NAME.txt
[ "$NATIVE" = nospy ] || [ "$NATIVE" = perf ] || .venv/bin/python benchmarks/profiles/summarize.py /tmp/h1/pyspy-$NAME.txt --top 25
