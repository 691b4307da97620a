set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NCCL_NVLS_ENABLE=0
W=/tmp/w; rm -rf $W; mkdir -p $W; tar xf .perf_payload/wt.tar -C $W; cd $W
{ python3 -c "import torch,jax,flax,optax,transformers,peft;print('torch',torch.__version__,'jax',jax.__version__,'flax',flax.__version__,'optax',optax.__version__,'transformers',transformers.__version__,'peft',peft.__version__)"; nvidia-smi --query-gpu=name,driver_version --format=csv; } > $OUT/versions.txt 2>&1
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 230 python3 benchmarks/bench_flax.py --rounds 3 --steps 12 --dtypes bf16 --jit-cases "ours-plain:q,v;ours-fused:q,v;ours-plain:q,k,v,o;ours-fused:q,k,v,o;nnx.LoRA:q,k,v,o" --idiom-dtypes "" --scaling-dtypes "" --profile-out $OUT/flax_profile.md --out $OUT/flax_gpu.md > $OUT/flax.log 2>&1
grep -B2 -A12 "| setup" $OUT/flax_gpu.md | head -14; head -16 $OUT/flax_profile.md | tail -10
timeout 100 python3 benchmarks/bench_train.py --device cuda --rounds 3 --steps 12 --warmup 3 --modes "" --dtypes bf16 --no-training --no-scaling --no-inference --compile-modes default --compile-setups ours,peft --compile-targets "q,k,v,o" --out $OUT/torch_compile.md > $OUT/compile.log 2>&1; grep -A7 "### torch.compile" $OUT/torch_compile.md | head -8
timeout 50 python3 -m pytest -q -p no:randomly -o addopts="-p no:cacheprovider" tests/torch_impl/test_train_paths_cuda.py -k "compile and not autotune" > $OUT/tests.log 2>&1; tail -2 $OUT/tests.log
