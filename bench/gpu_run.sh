#!/bin/bash
# Bench cells on a lent GPU machine (the workplace's `device` tool), within one call's time limit.
#
# The machine has PyTorch but not Ray, torch-pruning or Optuna, and cannot reach a registry: they travel
# as .gpu/site.tar.xz (unpacked wheels, Ray without its Java jars and dashboard UI) with the data file
# .gpu/cifar10-5k.npz; bench/cache (the cached bases) is carried too. Jobs run side by side until
# DEADLINE seconds have passed, then are stopped (every bench script is resumable per cell) and the
# cells, new bases and logs come back as $OUT/results.tar.gz. Untried so far: the session that wrote it
# (2026-11-24) was lent no GPU. Build .gpu/ first (git-ignored through .git/info/exclude): `pip download
# --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64` ray==2.60.0
# torch-pruning optuna sqlalchemy greenlet alembic mako colorlog jsonschema jsonschema-specifications
# referencing rpds-py; unzip them into one folder, delete ray/jars ray/dashboard/client/build ray/rllib
# ray/serve ray/llm (the 64 MiB carry limit), `tar -cJf .gpu/site.tar.xz -C FOLDER .`; copy the npz.
#
#   bash bench/gpu_run.sh DEADLINE JOB...     JOB: fidelity | quality20 | quality56 | search20 | aofp20 |
#                                                   metapruning20 | gpus
set -u
DEADLINE=$1; shift
START=$(date +%s)
mkdir -p /tmp/site && tar -C /tmp/site -xJf .gpu/site.tar.xz || exit 1
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -c "from widthsearch.app.cli import main; main()" "$@"\n' > /tmp/bin/widthsearch
chmod +x /tmp/bin/widthsearch
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PATH=/tmp/bin:$PATH
DATA=npz:$PWD/.gpu/cifar10-5k.npz
LOGS=bench/logs; mkdir -p $LOGS
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv | tee $LOGS/gpu.txt
python3 -c "import torch, ray, optuna, torch_pruning; print('torch', torch.__version__, 'ray', ray.__version__)"

NOPEERS="uniform tp-l1 tp-taylor tp-bnscale"
gpus_check() {  # the single-GPU path users rely on: search at 1, 0.5 and 0.25 GPU per trial, retrain, export
  local ckpt=bench/cache/cifar_resnet20-cifar10-5k-v0.2-e80-s0.pt
  for g in 1 0.5 0.25; do
    local c; c=$(python3 -c "print(max(1, round(1 / $g)))")
    local t0; t0=$(date +%s)
    widthsearch search --name gpu-$g --storage /tmp/runs --model cifar_resnet20 --checkpoint $ckpt --data $DATA \
      --val-fraction 0.2 --searcher random --num-samples 16 --concurrency "$c" --gpus-per-trial $g \
      --cpus-per-trial 1 --finetune-steps 100 --budget 0.5 --quiet || echo "FAILED search gpus $g"
    echo "gpus_per_trial $g concurrency $c: 16 trials in $(( $(date +%s) - t0 )) s"
  done
  widthsearch retrain gpu-0.25 --storage /tmp/runs --best --epochs 5 --gpus-per-trial 1 --out /tmp/export \
    --quiet || echo "FAILED retrain"
  ls /tmp/export && cat /tmp/export/metrics.json
}

for job in "$@"; do
  case $job in
    fidelity) cmd="python3 -m bench.fidelity --device cuda --data $DATA --threads 2" ;;
    quality20) cmd="python3 -m bench.quality --device cuda --data $DATA --threads 2 --methods $NOPEERS" ;;
    quality56) cmd="python3 -m bench.quality --model cifar_resnet56 --device cuda --data $DATA --threads 2 --methods $NOPEERS" ;;
    search20) cmd="python3 -m bench.quality --device cuda --data $DATA --threads 1 --concurrency 4 --methods optuna global gradient" ;;
    search56) cmd="python3 -m bench.quality --model cifar_resnet56 --device cuda --data $DATA --threads 1 --concurrency 4 --methods optuna global gradient" ;;
    aofp20) cmd="python3 -m bench.quality --device cuda --data $DATA --threads 2 --concurrency 1 --methods aofp" ;;
    metapruning20) cmd="python3 -m bench.quality --device cuda --data $DATA --threads 2 --concurrency 4 --methods metapruning" ;;
    gpus) cmd="gpus_check" ;;
    *) echo "unknown job $job"; continue ;;
  esac
  (eval "$cmd") > $LOGS/gpu-$job.log 2>&1 &
done

while [ $(( $(date +%s) - START )) -lt "$DEADLINE" ] && [ -n "$(jobs -r)" ]; do sleep 5; done
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv >> $LOGS/gpu.txt
for pid in $(jobs -p); do pkill -TERM -P "$pid"; kill "$pid"; done 2>/dev/null
sleep 2
pkill -9 -f "raylet|gcs_server|default_worker|ray::" 2>/dev/null
tail -n 5 $LOGS/gpu-*.log
tar -czf "$OUT/results.tar.gz" bench/results $LOGS bench/cache/*.json $(ls bench/cache/*resnet56*.pt 2>/dev/null)
