# session 12 run 9: the GPU test suite (-m gpu, all files) with the new dispatch; cut at 400 s
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p $OUT/r9; (nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; git log --oneline -1) > $OUT/r9/info.txt
timeout 400 python -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tail -30 > $OUT/r9/pytest_gpu.txt
date -u >> $OUT/r9/info.txt; tail -8 $OUT/r9/pytest_gpu.txt
