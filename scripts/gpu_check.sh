#!/usr/bin/env bash
# The Ray-free GPU check. Needs torch, tensorboard, pyyaml, tqdm, matplotlib, pytest and MNIST in data/mnist.
#   OUT=/tmp/gpu bash scripts/gpu_check.sh [tests|sweep|all]
# tests: the suite with CUDA (device-parametrised tests run on cpu and cuda; the stage workers run as
#        plain processes sharing the GPU, their data plane staged through host memory; Ray tests skip).
# sweep: the MNIST FCN-3..6 sweep (backprop, dni, cdni; 20 epochs) on the GPU, into results/mnist_fcn/h100.
set -u
cd "$(dirname "$0")/.."
MODE=${1:-all}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())"
  nproc; git rev-parse HEAD 2>/dev/null; } > "$OUT/env.txt" 2>&1
if [ "$MODE" = sweep ] || [ "$MODE" = all ]; then
  for k in 3 4 5 6; do
    timeout 480 python3 -m dni.cli compare "configs/mnist_fcn$k.yaml" --methods backprop,dni,cdni \
      --out "results/mnist_fcn/h100/fcn$k" log.dir=results/mnist_fcn/h100/runs device=cuda --no-progress \
      > "$OUT/fcn$k.log" 2>&1 &
  done
fi
if [ "$MODE" = tests ] || [ "$MODE" = all ]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests > "$OUT/pytest.log" 2>&1
  echo "pytest exit $?" >> "$OUT/pytest.log"
fi
wait
if [ "$MODE" != tests ]; then
  tar czf "$OUT/h100.tgz" --exclude='*.pt' --exclude='events.out*' results/mnist_fcn/h100
fi
tail -n 5 "$OUT"/*.log
