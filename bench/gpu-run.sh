#!/usr/bin/env bash
# One call on a lent GPU machine (Python 3.12 with CUDA torch, no network): install the wheels carried in .whl/
# (fetched here by `make gpu-wheels`), run the CUDA tests, then bench/restore.py and bench/decoded.py, and copy their
# results and logs to $OUT. A failing test does not keep the bench from running; the exit status says whether the
# tests or bench/restore.py failed. From the device tool: command `bash bench/gpu-run.sh`, carry [".whl"], timeout
# about 590 s. `bash bench/gpu-run.sh trace` runs bench/trace.py alone instead (a second call, about 400 s).
set -uo pipefail
out="${OUT:-/tmp}"
start=$(mktemp)  # results older than this are the committed ones, not this run's
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    $(ls .whl/*.whl | grep -v sharegpt) || exit 1
for p in layout daemon client cli; do ln -sfn "../$p" "hcache/$p"; done  # the package-dir mapping, without pip
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "${1:-}" = trace ]; then  # the ShareGPT wheel is read where it lies, in .whl/
    HCACHE_DATA_CACHE="$PWD/.whl" timeout 420 python3 bench/trace.py --max-context 1024 --budget-s 240 \
        2>&1 | tee "$out/gpu-trace.log"
    bench=$?
    find bench/results -name 'trace-nvidia*' -newer "$start" -exec cp {} "$out/" \;
    exit "$bench"
fi
python3 -m pytest -q -p no:cacheprovider tests/e2e/test_devices.py 2>&1 | tee "$out/gpu-tests.log"
tests=$?
python3 bench/restore.py 2>&1 | tee "$out/gpu-bench.log"
bench=$?
find bench/results -name 'restore-nvidia*' -newer "$start" -exec cp {} "$out/" \;
# What exactness costs decoded contexts: informational, bounded so that it cannot take the results above with it.
timeout 150 python3 bench/decoded.py 2>&1 | tee "$out/gpu-decoded.log"
find bench/results -name 'decoded-nvidia*' -newer "$start" -exec cp {} "$out/" \;
echo "tests exit $tests, bench exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
