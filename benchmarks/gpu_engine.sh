#!/bin/bash
# One device call: the engine on a GPU (no deepspeed or ray there): kernel + engine tests
# compiled (TRITON_INTERPRET unset), then the quickstart in fp32 and in bf16.
# Run from the repo root on the GPU machine; writes logs and summaries under $OUT.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
REPO=$PWD
mkdir -p /tmp/p/rankpm && for d in engine kernels cluster; do ln -sfn $REPO/$d /tmp/p/rankpm/$d; done
export PYTHONPATH=/tmp/p
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/device.txt
python3 -m pytest tests/kernels tests/engine -q -p no:cacheprovider -m "not slow" 2>&1 | tee $OUT/tests.log | tail -6
cd /tmp
for precision in fp32 bf16; do
  /usr/bin/time -f "%e s wall" python3 -m rankpm.engine.cli train $REPO/configs/quickstart.yaml \
    train.progress=false train.precision=$precision train.out_dir=/tmp/qs_$precision \
    > $OUT/quickstart_$precision.json 2> $OUT/quickstart_$precision.err
  echo "$precision: $(tail -1 $OUT/quickstart_$precision.err)"; tail -c 600 $OUT/quickstart_$precision.json; echo
done
