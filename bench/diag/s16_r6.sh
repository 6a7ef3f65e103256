# session 16 run 6: the GPU tests outside tests/test_nf4_mgpu.py that go through the NF4 dispatch
# (nf4_matmul forward and vjp, the model's training step, the bitsandbytes checks), after the
# unpadded nested absmax and plan.finish
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r6; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 240 python -m pytest -q -n 4 -m gpu tests/test_nf4.py tests/test_gpu_model.py tests/test_nf4_gpu_bnb.py -p no:cacheprovider --tb=line -rf 2>&1 | grep -v Warn | tail -15 > $D/pytest.txt
tail -4 $D/pytest.txt | cut -c1-400
date -u >> $D/info.txt
