#!/usr/bin/env bash
# Device calls for issue 17, each time-boxed so that a slow part cannot starve the rest; every
# script writes its tables as it goes, so what finished comes back even when a limit is hit.
#
#   PART=main    bash benchmarks/run_gpu.sh   # CUDA checks, torch eager/graph/scaling/inference,
#                                             # profile, Flax bf16 jit + nnx.jit/cached_partial
#   PART=compile bash benchmarks/run_gpu.sh   # torch.compile rows (each compile ~30-45 s)
#   PART=flax    bash benchmarks/run_gpu.sh   # the Flax rows left out of main (fp32, scaling)
#   PART=optins  bash benchmarks/run_gpu.sh   # issues 23-24: the Pallas kernels' CUDA tests, 4
#                                             # mixed adapters vs one (both frameworks, PEFT), then
#                                             # the Flax opt-ins (Pallas kernels; grouped q/k/v with
#                                             # bf16 factor copies and optax.flatten) at BERT-base
#                                             # (< 10 min)
#   PART=mixed   bash benchmarks/run_gpu.sh   # the kernels' CUDA tests and bench_mixed alone (< 6 min)
#   PART=shapes  bash benchmarks/run_gpu.sh   # issue 24 item 6: the opt-ins at the ~1B Llama shape
#                                             # (~2 min)
#   PART=whisper bash benchmarks/run_gpu.sh   # the opt-ins at whisper-small (< 10 min)
#   PART=leaves  bash benchmarks/run_gpu.sh   # the multi-adapter CUDA tests, then the BERT-base jit
#                                             # rows with the state as an nnx.State and as a flat
#                                             # list of arrays (host time a call; ~6 min)
#   PART=stacked bash benchmarks/run_gpu.sh   # the multi-adapter CUDA tests, then the ~1B Llama
#                                             # step fused (the default), plain and
#                                             # fused+stacked (~6 min)
#   PART=whisper-stacked bash benchmarks/run_gpu.sh  # whisper-small's step by default (the
#                                             # fused path) and fused+stacked, no decoding
#                                             # (~5 min); e.g.
#     WHISPER_FLAGS="--state-as leaves --pipelined 10" WHISPER_VARIANTS="plain,fused+stacked,fused+flatopt"
#                                             # the step as a loop that does not wait for each loss
#   PART=profile-llm bash benchmarks/run_gpu.sh  # the ~1B Llama step (4 blocks) kernel by kernel
#                                             # against the memory bound (profile_llm.py), then
#                                             # the BERT-base jit rows as nnx.State / as leaves
#                                             # (~7 min)
#   PART=profile-whisper bash benchmarks/run_gpu.sh  # whisper-small's step the same way (~5 min)
#   PART=thin    bash benchmarks/run_gpu.sh   # LoRA's thin GEMMs one at a time against the memory
#                                             # bound, and sliced factor gradients (~3 min)
#
# Measured on 2026-12-01 (one H200): PART=main took 363 s of wall time; a Flax BERT-base
# training step compiles in ~27 s, a torch.compile'd one in 32-43 s.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}
PART=${PART:-main}
mkdir -p "$OUT"

# The BERT-base jit rows with the state as an nnx.State, then as a flat list of arrays:
# state_rows <seconds a run> <bench_flax --jit-cases>
state_rows() {
  for as in state leaves; do
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$1" python3 benchmarks/bench_flax.py --rounds 3 --steps 12 \
      --dtypes bf16 --idiom-dtypes "" --scaling-dtypes "" --state-as "$as" \
      --jit-cases "$2" --out "$OUT/flax_state_as_$as.md" > "$OUT/flax_$as.log" 2>&1
  done
}
case "$PART" in
main)
  {
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
    timeout 45 python3 -m pytest -q -p no:randomly -o addopts="-p no:cacheprovider" tests/torch_impl/test_fused_cuda.py 2>&1 | tail -3
  } > "$OUT/env_and_cuda_tests.log" 2>&1
  timeout 190 python3 benchmarks/bench_train.py --device cuda --rounds 3 --steps 12 --warmup 3 \
    --setups full,ours,ours+qkv,peft,plain --deadline 150 \
    --out "$OUT/torch_gpu.md" --profile-out "$OUT/torch_gpu_profile.txt" > "$OUT/torch.log" 2>&1
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 235 python3 benchmarks/bench_flax.py --rounds 3 --steps 12 \
    --dtypes bf16 --jit-cases "ours:q,v;ours:q,k,v,o;ours-plain:q,k,v,o;nnx.LoRA:q,k,v,o" --idiom-setups ours \
    --scaling-dtypes "" --deadline 150 --out "$OUT/flax_gpu.md" > "$OUT/flax.log" 2>&1
  ;;
compile)
  timeout 590 python3 benchmarks/bench_train.py --device cuda --rounds 3 --steps 12 --warmup 3 --modes "" \
    --no-scaling --no-inference --compile-modes default,max-autotune-no-cudagraphs --compile-setups ours,ours+qkv,plain \
    --compile-targets "q,k,v,o;q,v" --deadline 400 --out "$OUT/torch_gpu_compile.md" > "$OUT/compile.log" 2>&1
  ;;
flax)
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 590 python3 benchmarks/bench_flax.py --rounds 3 --steps 12 \
    --dtypes fp32,bf16 --idiom-dtypes "" --scaling-dtypes bf16 --deadline 420 --out "$OUT/flax_gpu_more.md" > "$OUT/flax.log" 2>&1
  ;;
optins)
  JAX_PLATFORMS=cuda timeout 60 python3 -m pytest -q -p no:randomly -o addopts="-p no:cacheprovider" tests/flax_impl/test_kernels_cuda.py \
    > "$OUT/kernels_cuda_tests.log" 2>&1
  timeout 200 python3 benchmarks/bench_mixed.py --out "$OUT/mixed_gpu.md" > "$OUT/mixed.log" 2>&1
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 300 python3 benchmarks/bench_flax.py --rounds 3 --steps 12 \
    --dtypes bf16 --idiom-dtypes "" --scaling-dtypes "" --deadline 230 \
    --jit-cases "ours:q,v;ours-pallas:q,v;ours:q,k,v,o;ours-pallas:q,k,v,o;ours-grouped-bf16factors+flatopt:q,k,v,o;nnx.LoRA:q,k,v,o" \
    --out "$OUT/flax_optins_gpu.md" --hlo-out "$OUT/flax_optins_hlo.md" > "$OUT/flax.log" 2>&1
  ;;
mixed)
  timeout 300 python3 benchmarks/bench_mixed.py --out "$OUT/mixed_gpu.md" > "$OUT/mixed.log" 2>&1
  JAX_PLATFORMS=cuda timeout 60 python3 -m pytest -q -p no:randomly -o addopts="-p no:cacheprovider" tests/flax_impl/test_kernels_cuda.py \
    > "$OUT/kernels_cuda_tests.log" 2>&1
  if grep -q "graph: failed" "$OUT/mixed_gpu.md" 2>/dev/null; then  # where the graphs' assert comes from
    CUDA_LAUNCH_BLOCKING=1 timeout 100 python3 benchmarks/bench_mixed.py --no-flax --torch-modes graph --rounds 3 \
      --steps 3 > "$OUT/mixed_graph_blocking.log" 2>&1
  fi
  ;;
shapes)
  timeout 290 python3 benchmarks/bench_llm.py --steps 3 --no-compile --no-decode --flax-grouped \
    --out "$OUT/llm_optins_gpu.md" > "$OUT/llm.log" 2>&1
  ;;
whisper)
  # Its own call: on a cold H100 (2026-12-07) it wrote nothing within 280 s.
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 560 python3 benchmarks/bench_whisper.py --no-torch --steps 5 \
    --flax-variants fused+stacked,grouped+factor-copies+flatopt --out "$OUT/whisper_optins_gpu.md" > "$OUT/whisper.log" 2>&1
  ;;
leaves)
  # First the Flax multi-adapter path trained under jax.jit on the GPU (fp32 and bf16, < 1 min).
  JAX_PLATFORMS=cuda timeout 90 python3 -m pytest -q -p no:randomly -o addopts="-p no:cacheprovider" \
    tests/flax_impl/test_multi_adapter_cuda.py > "$OUT/multi_adapter_cuda_tests.log" 2>&1
  state_rows 280 "ours:q,v;ours:q,k,v,o;nnx.LoRA:q,k,v,o"
  ;;
stacked)
  # The multi-adapter CUDA tests (< 1 min), then the ~1B Llama step with flax_impl.fused's
  # backward and its stacked GEMMs (issue 22/24; ~5 min).
  JAX_PLATFORMS=cuda timeout 90 python3 -m pytest -q -p no:randomly -o addopts="-p no:cacheprovider" \
    tests/flax_impl/test_multi_adapter_cuda.py > "$OUT/multi_adapter_cuda_tests.log" 2>&1
  timeout 400 python3 benchmarks/bench_llm.py --rounds 5 --steps 5 --no-compile --no-decode --no-torch --flax-fused \
    --out "$OUT/llm_stacked_gpu.md" > "$OUT/llm.log" 2>&1
  ;;
whisper-stacked)
  # whisper-small's step with and without the stacked GEMMs (fc1's output, fc2's dx), no decoding
  # and no torch: three compilations (~5 min on a cold H100).
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 330 python3 benchmarks/bench_whisper.py --no-torch --no-generate ${WHISPER_FLAGS:-} \
    --steps 3 --flax-variants "${WHISPER_VARIANTS:-fused+stacked}" --out "$OUT/whisper_stacked_gpu.md" > "$OUT/whisper.log" 2>&1
  ;;
profile-llm)
  timeout 240 python3 benchmarks/profile_llm.py --layers 4 --steps 3 --out "$OUT/profile_llm.md" > "$OUT/profile_llm.log" 2>&1
  state_rows 110 "ours:q,v"
  ;;
profile-whisper)
  # whisper-small's step kernel by kernel: floor, default LoRA, fused+stacked with the sliced
  # factor gradients (three compilations, ~5 min on a cold H100).
  timeout 540 python3 benchmarks/profile_llm.py --model whisper --steps 3 --out "$OUT/profile_whisper.md" \
    > "$OUT/profile_whisper.log" 2>&1
  ;;
thin)
  timeout 280 python3 benchmarks/bench_thin_gemms.py --out "$OUT/thin_gemms.md" > "$OUT/thin.log" 2>&1
  ;;
*)
  echo "PART must be main, compile, flax, optins, mixed, shapes, whisper, whisper-stacked, leaves, stacked, profile-llm, profile-whisper or thin, got '$PART'" >&2
  exit 2
  ;;
esac
for f in "$OUT"/*.md; do echo "== $f"; grep -A40 "### Targets" "$f" || tail -n 25 "$f"; done 2>/dev/null | head -150
