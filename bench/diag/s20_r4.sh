# session 20, r4: every GPU test of the NF4 kernels (split=0 swap plans now take any divisor of
# the steps, so the test shapes may run splits they did not before), cut off at 420 s
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r4; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 420 python -m pytest -q -n 4 -m gpu tests/test_nf4_mgpu.py tests/test_nf4.py \
  -p no:cacheprovider --tb=line -rf 2>&1 | grep -v Warn > $D/pytest.txt
grep -c "" $D/pytest.txt; grep -v "^ \|^$" $D/pytest.txt | tail -12 | cut -c1-300
date -u >> $D/info.txt
