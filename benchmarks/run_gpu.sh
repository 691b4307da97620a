#!/usr/bin/env bash
# One device call for issue 17: CUDA checks, the torch tables, the Flax tables, torch.compile.
# Each part has its own time limit so that a slow one cannot starve the rest; every script
# writes its tables as it goes, so what finished comes back even when a limit is hit.
# Usage (on the GPU machine, from the repository root): OUT=/some/dir bash benchmarks/run_gpu.sh
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T_TESTS=${T_TESTS:-45} T_TORCH=${T_TORCH:-250} T_FLAX=${T_FLAX:-160} T_COMPILE=${T_COMPILE:-110}
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
  python3 -c "import torch, transformers, peft, jax, flax; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'jax', jax.__version__, 'flax', flax.__version__)"
  timeout "$T_TESTS" python3 -m pytest -q -p no:randomly -o addopts="-p no:cacheprovider" tests/torch_impl/test_fused_cuda.py 2>&1 | tail -3
} > "$OUT/env_and_cuda_tests.log" 2>&1
timeout "$T_TORCH" python3 benchmarks/bench_train.py --device cuda --rounds 3 --steps 12 --warmup 3 \
  --setups full,ours,ours+qkv,peft,plain --deadline $((T_TORCH - 40)) \
  --out "$OUT/torch_gpu.md" --profile-out "$OUT/torch_gpu_profile.txt" > "$OUT/torch.log" 2>&1
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$T_FLAX" python3 benchmarks/bench_flax.py --rounds 3 --steps 12 \
  --deadline $((T_FLAX - 55)) --out "$OUT/flax_gpu.md" > "$OUT/flax.log" 2>&1
timeout "$T_COMPILE" python3 benchmarks/bench_train.py --device cuda --rounds 3 --steps 12 --warmup 3 --modes "" \
  --no-scaling --no-inference --compile-modes default,max-autotune-no-cudagraphs --compile-setups ours,plain \
  --compile-targets "q,k,v,o" --deadline $((T_COMPILE - 70)) --out "$OUT/torch_gpu_compile.md" > "$OUT/compile.log" 2>&1
cat "$OUT/env_and_cuda_tests.log"
grep -h -A40 "### Targets" "$OUT/torch_gpu.md" "$OUT/flax_gpu.md" "$OUT/torch_gpu_compile.md" 2>/dev/null | head -90
tail -3 "$OUT/torch.log" "$OUT/flax.log" "$OUT/compile.log"
