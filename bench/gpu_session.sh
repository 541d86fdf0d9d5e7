#!/usr/bin/env bash
# One device call's worth of GPU work, in priority order, each step under its own time limit so a slow step cannot
# eat the next one's time; logs and rows go to $OUT (at most 8 files come back: keep them few).
#
#   run: bash bench/gpu_session.sh [steps...]
#   steps (default: all, in order):
#     baselines offloaded dynamic noprefetch noprefetch128 graph graph1 full2 policies codec policies128 policies128b:
#       decode rows; rows: the methods $ROWS_METHODS at the contexts $ROWS_CONTEXTS under $ROWS_LIMIT seconds;
#       codec_tests: the host codec's GPU tests; exact: the GPU test of exact_attention in pieces
#       (bench/decode.py), one method set per step, see the case below; decode_x4 (4 x 127K: full runs out of memory);
#       decode_packed; kernels; static, tests: the GPU tests; accuracy, accuracy2: the accuracy grid in two calls;
#     reliability: test_faults' pinned-memory fault cycles and a specache soak in 8 sequences (bench/soak.py);
#     fused_tests: the fused decode kernel's GPU tests (tests/kernels/test_fused_decode.py) and the static path through
#       it and the full-graph baseline's attention (tests/test_gpu.py); fused_kernels: bench/kernel_bench.py --only-fused
#       (fused_decode at 32K/128K x batch 1/8 x bits 2/1, the unfused ops beside it, a launch-shape sweep);
#       graph_rows / graph_b8: full-graph, full-flash and specache-graph decode rows at 8K/32K/128K batch 1 / 32K batch 8
#       (issue 18's comparison: one machine, one process per step); hf_generate: model.generate after specache.compile
#       (each policy's defaults: its static path with decode graphs) for specache, quant, streaming and snapkv beside
#       full-graph at 8K/32K/128K batch 1; hf_generate2: the same for cake, kcache, kvcomp and full, and the
#       unmodified model's own model.generate, at 8K/32K (issue 17's rows; ROWS_CONTEXTS overrides the contexts);
#     accuracy_bg: every policy's accuracy grid, one niced process per policy in the background (the tiny model leaves
#       the GPU idle: run it beside the GPU tests, never beside a timed step), waited for at the end
#
# A device command runs 10 minutes at most: pass the steps that fit one call (the limits below add up to it).
# Each step's time limit is what its runs took, with room: bench/results/gpu_session_timings.md keeps the
# measurements behind them (add a line there when a step is re-measured or cut).
#
# Every GPU row written is labelled with $SPECACHE_GIT_SHA (the device copy's .git may be stale): export it first,
#   export SPECACHE_GIT_SHA=$(git rev-parse --short HEAD)   # on this machine, pasted into the device command
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
pip install -e . --no-deps -q >/dev/null 2>&1
steps=${*:-baselines offloaded dynamic noprefetch noprefetch128 graph graph1 policies codec full2 policies128 policies128b accuracy_bg static tests decode_x4}
pytest_gpu() {  # name, time limit, pytest args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" python -m pytest -m gpu --tb=long -p no:logging -p no:cacheprovider "$@" >"$OUT/$name.log" 2>&1
  echo "$name: rc=$? $(tail -1 "$OUT/$name.log")"
}
for step in $steps; do
  case $step in
    static)  # the static decode path and CUDA graphs: first, they have never run on a GPU
      pytest_gpu gpu_static 240 tests/test_gpu.py -k "static or graph" ;;
    tests)  # every other GPU test
      pytest_gpu gpu_tests 480 tests/ -k "not static and not graph" ;;
    kernels)
      timeout 180 python bench/kernel_bench.py --rep 30 >"$OUT/kernels.log" 2>&1; echo "kernels: rc=$?" ;;
    fused_tests)
      pytest_gpu gpu_fused 240 tests/kernels/test_fused_decode.py tests/test_gpu.py -k "kernel_cuda or fused or capacity or static or graph" ;;
    fused_kernels)
      timeout 200 python bench/kernel_bench.py --only-fused --fused-sweep "" --rep 30 >"$OUT/kernels_fused.log" 2>&1
      echo "fused_kernels: rc=$?"; tail -30 "$OUT/kernels_fused.log"; kernel_rows=1
      # the launch-shape sweep at 32K batch 1, 2 bits: one shape a process (a fault ends only its own row), the
      # kernel launches synchronous so a fault names its kernel
      for shape in 32:4:2 64:8:2 64:4:3; do
        CUDA_LAUNCH_BLOCKING=1 timeout 60 python bench/kernel_bench.py --only-fused --sweep-only --fused-sweep "$shape" \
          --fused-contexts 32768 --fused-batches 1 --bits 2 --rep 30 >>"$OUT/kernels_sweep.log" 2>&1
        echo "sweep $shape: rc=$?"
      done ;;
    reliability)  # the pinned-memory fault cycles, then a soak in sequences: growth across sequences is a leak
      pytest_gpu gpu_faults 150 tests/reliability/test_faults.py
      timeout 200 python bench/soak.py --steps 1600 --sequences 8 --every 50 --policy specache \
        --out "$OUT/reliability.jsonl" >"$OUT/soak_gpu.log" 2>&1
      echo "soak: rc=$? $(tail -1 "$OUT/soak_gpu.log" | cut -c1-300)" ;;
    codec_tests)  # the KVComp host codec's GPU tests (pinned and pageable payloads)
      pytest_gpu gpu_codec 120 tests/runtime/test_host_codec.py tests/kernels/test_triton_kvcomp.py ;;
    exact)  # exact_attention in pieces of query rows (a prefill mask over 2^30 elements) equals one call
      pytest_gpu gpu_exact 90 tests/test_gpu.py -k exact_attention ;;
    baselines | offloaded | dynamic | noprefetch | noprefetch128 | graph | graph1 | full2 | policies | codec | policies128 | policies128b | rows | graph_rows | graph_b8 | hf_generate | hf_generate_b8 | hf_generate2)
      # decode rows, one method set per step; each step's limit is measured from earlier runs (rows written one by one:
      # a cut step keeps its finished rows). The full cache's rows (baselines, or full2 on a second machine) must come
      # from the same machine as the rows they are compared with.
      all="8192 32768 131072"; pol="quant kcache kvcomp cake streaming snapkv specache-cake specache:host_codec=kvcomp"
      fetch="--timed-fetch 2"; bs=1
      hf_ms="hf-generate-specache full-graph hf-generate-quant hf-generate-streaming hf-generate-snapkv"
      case $step in
        baselines) ms="full full-flash"; cs=$all; lim=400; fetch="--timed-fetch 0" ;;
        offloaded) ms="hf-offloaded"; cs=$all; lim=170 ;;
        dynamic) ms="specache"; cs=$all; lim=380 ;;
        noprefetch) ms="specache-noprefetch"; cs="8192 32768"; lim=200 ;;
        noprefetch128) ms="specache-noprefetch"; cs="131072"; lim=200 ;;
        graph) ms="specache-graph"; cs=$all; lim=240; fetch="--timed-fetch 0" ;;
        graph1) ms="specache-graph:bits=1"; cs="131072"; lim=200; fetch="--timed-fetch 0" ;;
        full2) ms="full"; cs="32768 131072"; lim=200; fetch="--timed-fetch 0" ;;
        policies) ms=$pol; cs="32768"; lim=420 ;;
        codec) ms="specache:host_codec=kvcomp"; cs="32768"; lim=320 ;;
        policies128) ms="quant kcache kvcomp cake"; cs="131072"; lim=560 ;;
        policies128b) ms="streaming snapkv specache-cake"; cs="131072"; lim=560 ;;
        rows) ms=${ROWS_METHODS:?set ROWS_METHODS}; cs=${ROWS_CONTEXTS:?set ROWS_CONTEXTS}; lim=${ROWS_LIMIT:-300} ;;
        graph_rows) ms="full-graph full-flash specache-graph"; cs=$all; lim=${ROWS_LIMIT:-540} ;;
        graph_b8) ms="full-graph full-flash specache-graph"; cs="32768"; bs=8; lim=${ROWS_LIMIT:-420} ;;
        # model.generate: the unmodified model, specache's defaults (static path, decode graphs), the full policy, and
        # the strongest baseline in the same process
        # (no timed fetch: these rows compare step and GPU busy time; its extra synchronised steps only add device time)
        hf_generate) ms=$hf_ms; cs=${ROWS_CONTEXTS:-$all}; lim=${ROWS_LIMIT:-540}; fetch="--timed-fetch 0" ;;
        hf_generate_b8) ms=$hf_ms; cs=${ROWS_CONTEXTS:-32768}; bs=8; lim=${ROWS_LIMIT:-540}; fetch="--timed-fetch 0" ;;
        # the other policies' static paths under model.generate, and the unmodified model's own loop
        # plain torch.compile(model) under the same loop: the first-call reference (compile_s, prefill_s)
        hf_generate2) ms=${ROWS_METHODS:-"hf-generate-cake hf-generate-kcache hf-generate-kvcomp hf-generate-full hf-generate
          hf-generate-torch.compile"}
          cs=${ROWS_CONTEXTS:-"8192 32768"}; lim=${ROWS_LIMIT:-540}; fetch="--timed-fetch 0" ;;
      esac
      # shellcheck disable=SC2086
      timeout $lim python bench/decode.py --methods $ms --contexts $cs --batches $bs --steps 6 --warmup 3 $fetch --profile-steps 1 \
        --inner eager --no-plot >"$OUT/$step.log" 2>&1
      echo "$step: rc=$?"; grep -E "^\S+ [0-9]+ [0-9]+ \{|^    +[0-9.]+ ms" "$OUT/$step.log" | cut -c1-300; decode_rows=1 ;;
    decode_x4)  # where the full cache runs out of memory: 4 x 127K (a power-of-two pinned block per store, 64 GiB)
      timeout 100 python bench/decode.py --methods full --contexts 130048 --batches 4 --extra --steps 4 \
        --warmup 2 --timed-fetch 0 --profile-steps 0 --no-plot >"$OUT/decode_x4.log" 2>&1
      timeout 300 python bench/decode.py --methods specache-graph --contexts 130048 --batches 4 --extra --steps 6 \
        --warmup 3 --timed-fetch 0 --profile-steps 1 --inner eager --no-plot >>"$OUT/decode_x4.log" 2>&1
      echo "decode_x4: rc=$?"; grep -E "^\S+ [0-9]+ [0-9]+ \{" "$OUT/decode_x4.log" | cut -c1-300; decode_rows=1 ;;
    decode_packed)  # the full cache with GQA heads packed (no repeat_kv): compare it with full in decode.jsonl
      timeout 300 python bench/decode.py --methods full-packed --contexts 8192 32768 131072 --extra \
        --steps 8 --warmup 3 --timed-fetch 0 --profile-steps 1 --no-plot >"$OUT/decode_packed.log" 2>&1
      echo "decode_packed: rc=$?"; grep -E "^\S+ [0-9]+ [0-9]+ \{" "$OUT/decode_packed.log" | cut -c1-300; decode_rows=1 ;;
    accuracy | accuracy2)  # the full grid in two calls' worth of policies, rows per cell; heatmaps tarred
      if [ "$step" = accuracy ]; then ps="baseline specache specache:bits=1 full quant kvcomp"
      else ps="streaming:budget=0.15 snapkv:budget=0.15 cake:budget=0.15 kcache specache:layer_budgets=cake
               specache:host_codec=kvcomp"; fi
      mkdir -p "bench/results/$step"
      # shellcheck disable=SC2086
      timeout 540 python -m specache_compile.cli eval --policies $ps --contexts 1024 2048 4096 8192 16384 \
        --depths 0 0.25 0.5 0.75 1 --trials 2 --agree-tokens 256 --inner eager \
        --out "bench/results/$step/accuracy.jsonl" >"bench/results/$step/eval.log" 2>&1
      echo "$step: rc=$? rows=$(wc -l <"bench/results/$step/accuracy.jsonl")"
      tar czf "$OUT/$step.tgz" "bench/results/$step" ;;
    accuracy_bg)  # one process per policy spec, in the background; rows and heatmaps per spec under accuracy_bg/
      mkdir -p bench/results/accuracy_bg
      for p in baseline full specache specache:bits=1 specache:static=true specache:speculative=false \
               specache:miss_rule=fetch quant kvcomp kcache cake:budget=0.15 snapkv:budget=0.15 \
               streaming:budget=0.15 specache:layer_budgets=cake specache:host_codec=kvcomp; do
        d="bench/results/accuracy_bg/${p//[:=.]/_}"; mkdir -p "$d"
        timeout "${ACC_LIMIT:-500}" nice -n 10 python -m specache_compile.cli eval --policies "$p" \
          --contexts 1024 2048 4096 8192 --depths 0 0.25 0.5 0.75 1 --trials 2 --agree-tokens 256 --inner eager \
          --out "$d/accuracy.jsonl" >"$d/eval.log" 2>&1 &
      done
      bg_accuracy=1 ;;
    *) echo "unknown step $step (expected: reliability fused_tests fused_kernels graph_rows graph_b8 hf_generate hf_generate2 codec_tests exact static tests kernels rows baselines offloaded dynamic noprefetch noprefetch128 graph graph1 full2 policies codec policies128 policies128b decode_x4 decode_packed accuracy accuracy2 accuracy_bg)"; exit 2 ;;
  esac
done
if [ -n "${bg_accuracy:-}" ]; then
  wait; echo "accuracy_bg: rows=$(cat bench/results/accuracy_bg/*/accuracy.jsonl | wc -l)"
  tar czf "$OUT/accuracy_bg.tgz" bench/results/accuracy_bg
fi
# the rows (appended to the copies in the working tree the device received): back with the logs
if [ -n "${decode_rows:-}" ]; then cp bench/results/decode.jsonl "$OUT/"; fi
case " $steps " in *" kernels "*) kernel_rows=1 ;; esac
if [ -n "${kernel_rows:-}" ]; then cp bench/results/kernels.jsonl "$OUT/"; fi
ls "$OUT"
