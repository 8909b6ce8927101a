#!/usr/bin/env bash
# GPU checks and latencies of the shipped perception models, in one run (issue 8).
# Usage: OUT=/some/dir bash bench/perception_gpu.sh   (on a machine with CUDA and torch)
# CPU figures in the same run use 2 threads, like the 2-core CI machine.
set -uo pipefail
PY=${PY:-python3}
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
[ -d .whl ] && $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

{
  nvidia-smi -L
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
  $PY -m pytest -q -p no:cacheprovider -o filterwarnings=error tests/test_perception_cuda.py
  $PY bench/perception_tip.py --frames 0 --changes 0 --vgg-steps 0 --threads 2 --repeats 100 --out-dir "$OUT"
  $PY bench/perception_sr.py --speed-only --threads 2 --repeats 50
  $PY bench/perception_defects.py --parts speed --threads 2 --repeats 50
} 2>&1 | tee "$OUT/perception_gpu.log"
cp bench/out/perception_sr*.json bench/out/perception_defects*.json "$OUT"/ 2>/dev/null; true
