#!/usr/bin/env bash
# Every GPU figure of the benchmarks in one command, on a machine with an NVIDIA GPU
# where llama.cpp was built with CUDA (`make setup` does so where nvcc is found, or
# LLAMA_CPP_DIR names such a build) and FSE_GPU_MODEL names a GGUF:
#
#   FSE_GPU_MODEL=M.gguf OUT=gpu-out bash bench/gpu.sh
#
# Each benchmark runs under its own time limit so that a slow one leaves the others'
# figures; results go to $OUT (default gpu-out/), one file each, as the benchmarks
# print them, with stages.txt saying how each ended.
set -u
MODEL=${FSE_GPU_MODEL:?set FSE_GPU_MODEL to a GGUF (remote.sh does)}
OUT=${OUT:-gpu-out}
PY=${PY:-python3}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1

stage() {  # stage NAME SECONDS COMMAND...: run, keep its output, note how it ended
    local name=$1 limit=$2
    shift 2
    echo "$(date +%T) $name" >> "$OUT/stages.txt"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "$(date +%T) $name exit $?" >> "$OUT/stages.txt"
}

stage engine 60 $PY bench/bench_engine.py --rounds 3 --model "$MODEL" --llama-args "-ngl 99"
stage graph_stats 45 $PY bench/bench_graph_stats.py --rounds 3 --model "$MODEL"
stage batched 90 $PY bench/bench_batched.py --rounds 2 --model "$MODEL" --llama-args "-ngl 99"
stage server 150 $PY bench/bench_server.py --rounds 2 --streams 1,8,16 --model "$MODEL" \
    --server-args "-ngl 99" --fse-args "--gpu-layers all"
