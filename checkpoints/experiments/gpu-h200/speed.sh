#!/bin/bash
# Device check: seconds an epoch of the ResNet-56 recipe, eager against torch.compile (side by side).
set -u
OUT=${OUT:-/tmp/out}; PY=${PY:-python3}; LIMIT=${LIMIT:-125}; EXTRA=${EXTRA:-}
mkdir -p "$OUT" /work/shared/data
[ -f /work/shared/data/cifar10-jpeg.tar.gz ] || cp .gpu/cifar10-jpeg.tar.gz /work/shared/data/
export EE_DATA_CACHE=/tmp/eecache PYTHONUNBUFFERED=1
DATA=/work/shared/data/cifar10-jpeg.tar.gz
$PY -c "from training.datasets import load_split; load_split('$DATA', 'train')" || exit 1
R56="--model mwresnet56_5 --early-head conv2 --head-grad-scale 0.1 --schedule onecycle --cutout 16 --distill-weight 0.5 --temperature 3 --data $DATA --amp bf16 --threads 4 --no-progress --epochs 4 $EXTRA"
timeout $LIMIT $PY -m training.train $R56 --lr 0.1 --compile off --output /tmp/s/eager/m.safetensors > "$OUT/eager.log" 2>&1 &
timeout $LIMIT $PY -m training.train $R56 --lr 0.1 --compile on --output /tmp/s/compiled/m.safetensors > "$OUT/compiled.log" 2>&1 &
timeout $LIMIT $PY -m training.train $R56 --lr 0.2 --batch-size 512 --compile on --output /tmp/s/b512/m.safetensors > "$OUT/compiled-b512.log" 2>&1 &
wait
for f in "$OUT"/*.log; do echo "== $f"; grep -v "^\s*$" "$f" | tail -n 6; done
