#!/usr/bin/env bash
# The one device call of a GPU session: unpack the carried Python packages, run bench/gpu_check.py, and pack its
# logs for the trip back.
#
#   bash bench/gpu_run.sh [gpu_check.py arguments]
#
# Expects, in the checkout (git-ignored, carried to the GPU host): .gpu/site312.tar.xz, a tarball of the packages the
# host lacks (ray without its Java jar, optuna, rasterio and their dependencies, unpacked from cp312 manylinux wheels,
# see ../shared/gpu/offline-wheels.sh), which fits the 64 MiB a call may carry only as xz. Writes $OUT/summary.json,
# $OUT/gpu_check_logs.tar.gz (every log, results.parquet and summary, no checkpoints) and prints the summary last.
set -u
cd "$(dirname "$0")/.."
SITE=/tmp/tune_agb_site
OUTDIR=/tmp/gpu_check_out
mkdir -p "$SITE" "${OUT:=/tmp/gpu_out}"
t0=$(date +%s)
if [ -f .gpu/site312.tar.xz ] && [ ! -d "$SITE/ray" ]; then
    tar -xJf .gpu/site312.tar.xz -C "$SITE" 2>/dev/null ||
        python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" .gpu/site312.tar.xz "$SITE"
fi
# The tarball was made from unzipped wheels: give Ray's two executables back the mode pip would have set.
chmod +x "$SITE/ray/core/src/ray/gcs/gcs_server" "$SITE/ray/core/src/ray/raylet/raylet"
echo "packages unpacked in $(($(date +%s) - t0)) s"
export PYTHONPATH="$SITE:$PWD"
python3 bench/gpu_check.py --out "$OUTDIR" "$@"
rc=$?
cp "$OUTDIR/summary.json" "$OUT/" 2>/dev/null
tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$OUTDIR" --exclude='cache' --exclude='checkpoint_*' \
    --exclude='*.pt' --exclude='*.npy' --exclude='*.tif' . 2>/dev/null
ls -la "$OUT"
exit $rc
