# (MgpuPlan.pair was removed after session 15: run at commit 750054b)
# session 15 run 2: r1's pair plans hung in the bench (M=1) and failed in pytest: per-quadrant
# errors and hangs, one process per case (bench/diag/s15_pair_probe.py); then the GPU tests of
# session 14's table decoder plans alone, failures listed
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r2; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
python bench/diag/s15_pair_probe.py --timeout 40 2>&1 | tee $D/probe.txt
timeout 120 python -m pytest -q -n 4 tests/test_nf4_mgpu.py -k "matches_reference_on_gpu and (L32P1 or L16P2) and not P2C" -p no:cacheprovider --tb=line -rf 2>&1 | grep -v Warn | tail -25 > $D/pytest.txt
tail -25 $D/pytest.txt | cut -c1-300
date -u >> $D/info.txt
