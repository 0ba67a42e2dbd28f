#!/usr/bin/env bash
# Download what tools/gpu_check.sh installs offline on a bare GPU machine (torch + CUDA + triton, Python 3.12,
# no DeepSpeed, no package registry). Run it on a machine that reaches the registry, then copy DIR over:
#
#   tools/gpu_wheels.sh DIR          # then, on the GPU machine: tools/gpu_check.sh OUT_DIR --wheels DIR
#
# DIR gets DeepSpeed 0.19.8's sdist (installed there with DS_BUILD_OPS=0: no CUDA extension is compiled) and
# Python 3.12 x86_64 wheels (GPU_PYTHON_VERSION=3.11 for another Python) of
#   - DeepSpeed's runtime dependencies other than torch: hjson, pydantic (+ pydantic-core, annotated-types,
#     typing-inspection, typing-extensions), einops, msgpack, ninja, psutil, py-cpuinfo;
#   - datasets 5.2.0 and its dependencies (pyarrow, pandas, dill, multiprocess, xxhash, fsspec, huggingface-hub, ...):
#     kd's data pipeline, so bench_step and kd train, need it;
#   - pytest and its dependencies, for `pytest -m gpu`.
# gpu_check.sh installs only the distributions the GPU machine does not already have. Nothing here depends on torch,
# so the machine's own torch (its CUDA build) is the one that runs. About 100 MB.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
DIR=$1
mkdir -p "$DIR"
PY=${PYTHON:-python3}
VERSION=${GPU_PYTHON_VERSION:-3.12}  # the GPU machine's Python
TARGET=(--only-binary=:all: --python-version "$VERSION" --implementation cp --abi "cp${VERSION//./}"
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)

# DeepSpeed's own sdist: no wheel is published, and --no-deps keeps torch (a CUDA build, GBs) out of the download
"$PY" -m pip download --no-deps --no-binary=:all: -d "$DIR" deepspeed==0.19.8
# everything else with its dependencies resolved for the GPU machine's Python
"$PY" -m pip download "${TARGET[@]}" -d "$DIR" \
  hjson "pydantic>=2.5" einops msgpack ninja psutil py-cpuinfo "datasets==5.2.0" "pytest>=8"
ls "$DIR" | grep -i torch && { echo "error: a torch wheel was pulled in; remove it" >&2; exit 1; }
du -sh "$DIR"
