#!/bin/bash
# One device call for the ranked loss: its kernel tests compiled (TRITON_INTERPRET unset),
# the breakdown + tile sweep + host-cost script, then the benchmark file and its report.
# Run from the repo root on the GPU machine; logs and JSON go under $OUT.
#   SWEEP=0 skips the sweep; RANKED_PREV=file also times an older ranked_loss.py.
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
mkdir -p /tmp/p/rankpm && ln -sfn $PWD/kernels /tmp/p/rankpm/kernels
export PYTHONPATH=/tmp/p${PYTHONPATH:+:$PYTHONPATH}
[ -n "$RANKED_PREV" ] && export RANKED_PREV=$(realpath $RANKED_PREV)
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee $OUT/device.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a $OUT/device.txt
python3 -m pytest tests/kernels/test_ranked_loss.py -q -p no:cacheprovider -n ${JOBS:-8} 2>&1 | tee $OUT/tests.log | tail -3
cd benchmarks
python3 sweep_ranked.py 2>&1 | tee $OUT/sweep.log
python3 -m pytest bench_ranked_loss.py -q -p no:cacheprovider --benchmark-json=$OUT/gpu_ranked.json \
  2>&1 | tee $OUT/bench.log | tail -3
python3 report.py $OUT/gpu_ranked.json --out $OUT/gpu_ranked | tail -12
python3 - $OUT/gpu_ranked.json <<'PY'
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    e = b["extra_info"]
    print(e.get("variant"), {k: e[k] for k in ("device_ms", "host_ms", "graph_ms", "copy_GBps",
          "empty_launch_us", "peak_extra_bytes", "bytes") if e.get(k) is not None})
PY
