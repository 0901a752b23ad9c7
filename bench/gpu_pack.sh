#!/usr/bin/env bash
# Build .gpu/site312.tar.xz, the packages bench/gpu_run.sh unpacks on a GPU host without network (Python 3.12, with
# torch, numpy, pandas, pyarrow, pyyaml, fsspec, aiohttp... already there): ray 2.60 (no Java jar, JS source maps,
# rllib, serve or llm), optuna 5, rasterio and their dependencies, from cp312 manylinux wheels. A call may carry
# 64 MiB in all; as wheels these are ~91 MB, as one xz tarball 63 MB. xz -9e takes ~15 min on 2 busy cores.
#
#   bash bench/gpu_pack.sh            (run in the repository root, where pip reaches PyPI)
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bash ../shared/gpu/offline-wheels.sh "$work/whl"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$work/whl" rasterio==1.5.2 affine click-plugins cligj
python3 - "$work/whl" "$work/site" <<'PY'
import glob, os, sys, zipfile
for whl in glob.glob(os.path.join(sys.argv[1], "*.whl")):
    with zipfile.ZipFile(whl) as z:
        z.extractall(sys.argv[2])  # modes are not kept: gpu_run.sh gives Ray's two executables theirs back
PY
rm -rf "$work/site/ray/rllib" "$work/site/ray/serve" "$work/site/ray/llm"
mkdir -p .gpu
tar -C "$work/site" -cf - . | xz -9e -T0 > .gpu/site312.tar.xz
ls -la .gpu/site312.tar.xz
