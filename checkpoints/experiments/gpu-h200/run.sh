#!/bin/bash
# Device run: a new ResNet-56 (5 exits, conv2 heads) and a ResNet-20 distilled from the committed
# ResNet-56, side by side on one GPU; epochs sized from a 2-epoch probe so both end inside TOTAL s.
set -u
START=$(date +%s)
TOTAL=${TOTAL:-540}
PY=${PY:-python3}
OUT=${OUT:-/tmp/out}
EXTRA=${EXTRA:-}
mkdir -p "$OUT" /work/shared/data
[ -f /work/shared/data/cifar10-jpeg.tar.gz ] || cp .gpu/cifar10-jpeg.tar.gz /work/shared/data/
export EE_DATA_CACHE=/tmp/eecache PYTHONUNBUFFERED=1
DATA=/work/shared/data/cifar10-jpeg.tar.gz
{ date -u; git rev-parse HEAD; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1;
  $PY -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"; nproc; } > "$OUT/machine.txt"
cat "$OUT/machine.txt"
$PY -c "from training.datasets import load_split; load_split('$DATA', 'train')" || exit 1
R56="--model mwresnet56_5 --early-head conv2 --head-grad-scale 0.1 --schedule onecycle --lr 0.1 --cutout 16 --distill-weight 0.5 --temperature 3"
R20="--model mwresnet20_3 --schedule onecycle --lr 0.1 --cutout 16 --exit-weights 0.5,0.5,1 --distill-weight 0.5 --temperature 3 --teacher checkpoints/mwresnet56_5.safetensors --teacher-weight 0.5"
COMMON="--data $DATA --amp bf16 --threads 4 --no-progress $EXTRA"
mkdir -p /tmp/probe /tmp/gpu/r56 /tmp/gpu/r20
$PY -m training.train $R56 $COMMON --epochs 2 --output /tmp/probe/r56.safetensors > /tmp/probe/r56.log 2>&1 &
$PY -m training.train $R20 $COMMON --epochs 2 --output /tmp/probe/r20.safetensors > /tmp/probe/r20.log 2>&1 &
wait
tail -n 3 /tmp/probe/r56.log /tmp/probe/r20.log
T56=$($PY -c "import json;print(json.loads(open('/tmp/probe/r56.log.jsonl').readlines()[-1])['seconds'])") || exit 1
T20=$($PY -c "import json;print(json.loads(open('/tmp/probe/r20.log.jsonl').readlines()[-1])['seconds'])") || exit 1
LEFT=$(( TOTAL - ($(date +%s) - START) - 40 ))
E56=$($PY -c "print(max(2, min(${CAP56:-200}, int(($LEFT - 25) * 0.93 / $T56))))")
E20=$($PY -c "print(max(2, min(${CAP20:-300}, int(($LEFT - 25) * 0.93 / $T20))))")
echo "probe: r56 ${T56}s/epoch, r20 ${T20}s/epoch; ${LEFT}s left: r56 $E56 epochs, r20 $E20 epochs" | tee "$OUT/plan.txt"
STOP=$(( LEFT ))
timeout $STOP $PY -m training.train $R56 $COMMON --epochs $E56 --output /tmp/gpu/r56/mwresnet56_5.safetensors > /tmp/gpu/r56/mwresnet56_5.train.log 2>&1 &
timeout $STOP $PY -m training.train $R20 $COMMON --epochs $E20 --output /tmp/gpu/r20/mwresnet20_3.safetensors > /tmp/gpu/r20/mwresnet20_3.train.log 2>&1 &
wait
tail -n 4 /tmp/gpu/r56/mwresnet56_5.train.log /tmp/gpu/r20/mwresnet20_3.train.log
(cd /tmp/gpu && tar czf "$OUT/r56.tgz" r56 && tar czf "$OUT/r20.tgz" r20)
ls -la "$OUT"; echo "total $(( $(date +%s) - START ))s"
