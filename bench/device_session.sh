#!/usr/bin/env bash
# One device session's work as a background job: a copy of the tree (the device tool re-lays the tree at
# every call), the build, then the named phases in order, each logged. Start it detached and poll:
#
#   bash bench/device_session.sh start build cuda-core steps      # returns at once
#   bash bench/device_session.sh poll $OUT                       # progress + results so far into $OUT
#   bash bench/device_session.sh sync                            # the tree's python/ into the installed package
#
# Phases: build, cuda-core (the kernels and steps' CUDA tests), cuda-all (every CUDA test; cuda-all-verbose: the
# same, a line per test so a partial log reads), steps
# (bench_steps: T-token steps, speculation, exactness, host KV), model (bench_model vs stock: prefill and
# decode headline rows), steps-quick (steps and speculation at 32k and 131k), profile (profile_decode),
# offload (bench_offload 262k), families (bench_families), codec (bench_kv_codec),
# compression (#29: the encoded cache's CUDA tests, host decode at 131k raw and encoded).
set -u
WORK=/tmp/ci_work
RES=/tmp/ci_results

run_phase() {
  local phase=$1
  echo "$(date +%T) start $phase" >> "$RES/progress.log"
  local t0=$(date +%s) rc=0
  case $phase in
    build)
      TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 -m pip install --no-build-isolation --no-deps . \
        > "$RES/build.log" 2>&1 || rc=$?
      python3 -c "import chunkinfer, json; print(json.dumps(chunkinfer.build_info()))" >> "$RES/build.log" 2>&1 ;;
    cuda-core)
      python3 -m pytest -q -m cuda -p no:cacheprovider tests/ops/test_attention.py tests/ops/test_gemv.py \
        tests/e2e/test_steps.py tests/e2e/test_decode_graph.py -rfE > "$RES/cuda_core.log" 2>&1 || rc=$? ;;
    cuda-all)
      python3 -m pytest -q -m cuda -p no:cacheprovider tests -rfE > "$RES/cuda_all.log" 2>&1 || rc=$? ;;
    cuda-all-verbose)  # every CUDA test, the kernels' and the last failures' files first, one line per test
      first="tests/ops/test_attention.py tests/e2e/test_convert_cuda.py tests/e2e/test_device_map.py
             tests/e2e/test_kv_offload.py tests/e2e/test_steps.py tests/e2e/test_decode_graph.py
             tests/ops/test_gemv.py tests/ops/test_rotary.py tests/ops/test_layernorm.py tests/ops/test_activation.py
             tests/ops/test_kv_codec.py"  # files in this order (a folder among them would reorder them)
      python3 -m pytest -v -m cuda -p no:cacheprovider --durations=15 $first -rfE > "$RES/cuda_all.log" 2>&1 || rc=$?
      python3 -m pytest -v -m cuda -p no:cacheprovider --durations=15 tests $(printf -- '--ignore=%s ' $first) -rfE \
        > "$RES/cuda_rest.log" 2>&1 || rc=$? ;;
    steps)
      python3 -m bench.bench_steps --lengths 32768 131072 --exact-length 32768 --exact-tokens 512 \
        --offload-length 262144 --out "$RES/steps_h200.jsonl" > "$RES/steps.log" 2>&1 || rc=$? ;;
    steps-quick)
      python3 -m bench.bench_steps --lengths 32768 131072 --generate-tokens 64 --out "$RES/steps_quick_h200.jsonl" \
        > "$RES/steps_quick.log" 2>&1 || rc=$? ;;
    profile)
      python3 -m bench.profile_decode --lengths 32768 131072 --out "$RES/profile_decode_h200.jsonl" \
        > "$RES/profile.log" 2>&1 || rc=$? ;;
    model)
      python3 -m bench.bench_model --lengths 32768 131072 --skip-stock-above 131072 --decode \
        --generate-lengths 32768 131072 --llama3-rope --out "$RES/model_h200.jsonl" > "$RES/model.log" 2>&1 || rc=$? ;;
    offload)
      python3 -m bench.bench_offload --lengths 262144 --out "$RES/offload_h200.jsonl" > "$RES/offload.log" 2>&1 || rc=$? ;;
    families)
      python3 -m bench.bench_families --out "$RES/families_h200.jsonl" > "$RES/families.log" 2>&1 || rc=$? ;;
    codec)
      python3 -m bench.ops.bench_kv_codec --out "$RES/kv_codec_h200.jsonl" > "$RES/codec.log" 2>&1 || rc=$? ;;
    compression)  # #29: the encoded cache's CUDA tests, then host decode at 131k raw and encoded, same machine
      python3 -m pytest -v -m cuda -p no:cacheprovider tests/kv/test_encoded.py tests/e2e/test_kv_compression.py \
        -rfE > "$RES/compression_tests.log" 2>&1 || rc=$?
      for flag in "" --kv-compression; do
        python3 -m bench.bench_host_decode --lengths 131072 --shares 0,auto $flag \
          --out "$RES/host_decode_compression_h200.jsonl" >> "$RES/compression_bench.log" 2>&1 || rc=$?
      done ;;
    *) echo "unknown phase $phase" >> "$RES/progress.log"; rc=2 ;;
  esac
  echo "$(date +%T) end $phase rc=$rc $(( $(date +%s) - t0 )) s" >> "$RES/progress.log"
}

case ${1:-} in
  start)
    shift
    mkdir -p "$RES" && rm -rf "$WORK" && cp -r "$(pwd)" "$WORK"
    cd "$WORK" && setsid bash -c "cd $WORK; for p in $*; do bash bench/device_session.sh phase \$p; done; \
      echo \"\$(date +%T) all done\" >> $RES/progress.log" > "$RES/job.log" 2>&1 < /dev/null &
    echo "started: $*" ;;
  phase)
    run_phase "$2" ;;
  sync)
    site=$(python3 -c "import chunkinfer, os; print(os.path.dirname(chunkinfer.__file__))")
    cp -r python/chunkinfer/. "$site/" && rm -rf "$WORK/python" "$WORK/tests" "$WORK/bench" \
      && cp -r python tests bench "$WORK/" && echo "synced python/, tests/, bench/ into $site and $WORK" ;;
  poll)
    out=${2:-/tmp}
    cat "$RES/progress.log" 2>/dev/null
    for f in "$RES"/*; do [ -f "$f" ] && cp "$f" "$out/"; done
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader ;;
  *) echo "usage: $0 start PHASE... | poll OUT | sync" ; exit 2 ;;
esac
