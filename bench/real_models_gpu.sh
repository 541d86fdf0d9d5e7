#!/usr/bin/env bash
# The RULER-style suite on the real pretrained models (specache_compile/models.py) on the lent GPU, where nothing can
# be installed and a call carries at most 64 MiB: the GGUF files travel in parts under .carry/m<i>/ over consecutive
# calls of a warm machine (bench/real_models_gpu.sh split, here), with the gguf reader's wheel under .whl/; the last
# call assembles them (sha256-checked by models.path) and runs the grid, one niced process per model x policy (the
# models are small: the GPU is shared), rows and logs tarred to $OUT.
#
#   here:   bash bench/real_models_gpu.sh split     # .carry/m0 .. m<n>, each under the per-call limit
#   device: bash bench/real_models_gpu.sh run [seconds]
set -uo pipefail
cd "$(dirname "$0")/.."
part_mb=${PART_MB:-40}  # the tracked tree travels too (about 23 MB): a part and it stay under 64 MiB
case ${1:-run} in
  split)
    rm -rf .carry/m*
    i=0
    for m in smollm2-135m gemma3-270m; do
      f=$(python3 -c "from specache_compile import models; print(models.path('$m'))") || exit  # verified, assembled
      tmp=$(mktemp -d); split -b "${part_mb}M" -d -a 2 "$f" "$tmp/${f##*/}.p"
      for p in "$tmp"/*; do mkdir -p ".carry/m$i"; mv "$p" ".carry/m$i/"; i=$((i + 1)); done
      rmdir "$tmp"
    done
    ls -la .carry/m*/ ;;
  run)
    limit=${2:-480}
    OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
    export SPECACHE_CACHE=${SPECACHE_CACHE:-/tmp/specache_cache}; mkdir -p "$SPECACHE_CACHE"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
    for name in SmolLM2-135M-Instruct.Q4_1.gguf gemma-3-270m-q4_k_m.gguf; do
      ls .carry/m*/"$name".p* >/dev/null 2>&1 && cat $(ls .carry/m*/"$name".p* | sort -t/ -k3) >"$SPECACHE_CACHE/$name"
    done
    ls -la "$SPECACHE_CACHE"
    # convert once per model (dequantized, saved under $SPECACHE_CACHE) before the parallel runs read it
    loaded=""
    for m in smollm2-135m gemma3-270m; do
      if timeout 200 python3 -c "from specache_compile import models; models.load('$m')" >"$OUT/load_$m.log" 2>&1; then
        loaded="$loaded $m"
      else
        echo "$m: not loaded (its parts not all carried?): $(tail -n 1 "$OUT/load_$m.log" | cut -c1-200)"
      fi
    done
    pols="baseline specache specache:bits=1 quant snapkv:budget=0.15 streaming:budget=0.15 kcache cake:budget=0.15"
    for m in $loaded; do
      if [ "$m" = smollm2-135m ]; then cs="1024 2048 4096 8192"; else cs="4096 8192 16384 32768"; fi
      d="$OUT/real_$m"; mkdir -p "$d"
      for p in $pols; do
        s=${p//[:=.]/_}
        # shellcheck disable=SC2086
        timeout "$limit" nice -n 10 python3 -m specache_compile.evals.harness --model "$m" --suite ruler --device cuda \
          --trials 1 --depths 0.5 --contexts $cs --policies "$p" --inner eager --out "$d/$s.jsonl" >"$d/$s.log" 2>&1 &
      done
    done
    wait
    for m in $loaded; do
      echo "$m: rows=$(cat "$OUT/real_$m"/*.jsonl 2>/dev/null | wc -l)"; tail -n 2 "$OUT/real_$m"/*.log | cut -c1-200
      tar czf "$OUT/real_$m.tgz" -C "$OUT" "real_$m" && rm -rf "${OUT:?}/real_$m"
    done ;;
esac
