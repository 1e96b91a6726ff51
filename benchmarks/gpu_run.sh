#!/bin/bash
# One device call: kernel tests compiled (TRITON_INTERPRET unset), then the benchmarks.
# Run from the repo root on the GPU machine; writes logs and JSON under $OUT.
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
mkdir -p /tmp/p/rankpm && ln -sfn $PWD/kernels /tmp/p/rankpm/kernels
export PYTHONPATH=/tmp/p${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee $OUT/device.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a $OUT/device.txt
${TESTS:-true} && python3 -m pytest tests/kernels -q -p no:cacheprovider -x 2>&1 | tee $OUT/tests.log | tail -4
cd benchmarks && python3 -m pytest ${BENCH:-bench_ranked_loss.py bench_linear_cross_entropy.py} -q -p no:cacheprovider \
  --benchmark-json=$OUT/gpu.json 2>&1 | tee $OUT/bench.log | tail -30
python3 report.py $OUT/gpu.json --out $OUT/gpu | tail -40
