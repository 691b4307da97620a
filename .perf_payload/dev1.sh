set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NCCL_NVLS_ENABLE=0
W=/tmp/w; rm -rf $W; mkdir -p $W; tar xf .perf_payload/wt.tar -C $W; cd $W
{ python3 -c "import torch,jax,flax,optax,transformers,peft;print('torch',torch.__version__,'jax',jax.__version__,'flax',flax.__version__,'optax',optax.__version__,'transformers',transformers.__version__,'peft',peft.__version__)"; nvidia-smi --query-gpu=name,driver_version --format=csv; } > $OUT/versions.txt 2>&1
cat $OUT/versions.txt
timeout 240 python3 -m pytest -q -p no:randomly -o addopts="-p no:cacheprovider" tests/torch_impl/test_train_paths_cuda.py tests/torch_impl/test_fused_cuda.py > $OUT/tests.log 2>&1; tail -5 $OUT/tests.log
timeout 110 python3 benchmarks/bench_train.py --device cuda --rounds 3 --steps 12 --warmup 3 --modes eager --dtypes bf16 --no-training --no-scaling --profile-infer $OUT/infer_profile.md --out $OUT/torch_infer.md > $OUT/infer.log 2>&1; grep -A30 "### Inference" $OUT/torch_infer.md | head -30; grep -A16 "host and GPU" $OUT/infer_profile.md
timeout 150 python3 benchmarks/bench_train.py --device cuda --rounds 3 --steps 12 --warmup 3 --modes "" --dtypes bf16 --no-training --no-scaling --no-inference --compile-modes default --compile-setups ours,ours+qkv,peft --compile-targets "q,k,v,o" --out $OUT/torch_compile.md > $OUT/compile.log 2>&1; grep -A8 "torch.compile" $OUT/torch_compile.md | head -12
