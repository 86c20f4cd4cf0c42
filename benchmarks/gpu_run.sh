#!/usr/bin/env bash
# The GPU measurements in one call on a lent GPU machine (see benchmarks/README.md, "One GPU lease").
#
#   bash benchmarks/gpu_run.sh prepare   # here, with network: wheels into .whl/, 750 photos into ddpm-heliconius/
#   bash benchmarks/gpu_run.sh           # there: install the wheels, then the parts below, logs in $OUT
#
# Parts, in this order, each started only if its usual time still fits in BUDGET seconds (default 540):
#   smoke    benchmarks/gpu_smoke.py, every shipped config (SMOKE_CONFIGS=a,b: those)        401 s on an H200
#   bench16  benchmark.py, batch 16: tutorial nw=8, butterflies.yaml, + butterflies-fast.yaml,
#            the project's DDPM-1000 and DDIM-50 grids                                        about 200 s
#   e2e      benchmark.py --end-to-end-only: 20 epochs on the 750 photos, tutorial nw=8 and
#            butterflies-fast.yaml, each from process start to its last file                  about 300 s
#   bench64  benchmark.py, batch 64, no grids (the MFU figure)                                about 150 s
# PARTS="e2e bench64" bash benchmarks/gpu_run.sh runs only those (e.g. in a second lease); the smoke part's full
# per-step logs come back in $OUT/smoke-logs/.
set -u
cd "$(dirname "$0")/.."
IMAGES=${IMAGES:-ddpm-heliconius}
WHEELS=(diffusers==0.42.1 datasets==5.2.0 jsonargparse==4.53.0 torchdata==0.11.0 dill==0.4.1 multiprocess==0.70.19
        importlib_metadata==10.2.0 docstring-parser==0.18.0 typeshed-client==2.15.0 importlib_resources==7.1.0)

if [ "${1:-}" = prepare ]; then
    set -e
    pip download --no-deps --only-binary=:all: --python-version 3.12 --dest .whl "${WHEELS[@]}"
    rm -rf "$IMAGES" && mkdir -p "$IMAGES"
    ls ../shared/data/heliconius/train | sort | head -750 | while read -r f; do
        cp "../shared/data/heliconius/train/$f" "$IMAGES/"
    done
    du -sh .whl "$IMAGES"
    exit 0
fi

OUT=${OUT:-/tmp/gpu-run}
BUDGET=${BUDGET:-540}
PARTS=${PARTS:-smoke bench16 e2e bench64}
mkdir -p "$OUT"
pip install --quiet --no-index --no-deps --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi; python -c "import sys, torch, lightning, diffusers, datasets; print(sys.version); print(torch.__version__, \
torch.version.cuda, lightning.__version__, diffusers.__version__, datasets.__version__)"; } > "$OUT/env.txt" 2>&1

part() {  # part NAME SECONDS COMMAND...: run it if wanted and if SECONDS still fit in the budget
    local name=$1 need=$2 left=$((BUDGET - SECONDS))
    shift 2
    case " $PARTS " in *" $name "*) ;; *) return ;; esac
    if [ "$left" -lt "$need" ]; then
        echo "$name: skipped, ${left} s left of ${BUDGET}, it needs about ${need}" | tee -a "$OUT/summary.txt"
        return
    fi
    local start=$SECONDS
    timeout "$left" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $? after $((SECONDS - start)) s: $*" | tee -a "$OUT/summary.txt"
}

FAST=(--project-args "" --project-args "-c configs/butterflies-fast.yaml")
part smoke 400 python benchmarks/gpu_smoke.py --images "$IMAGES" --work-dir /tmp/smoke ${SMOKE_CONFIGS:+--configs "$SMOKE_CONFIGS"}
find /tmp/smoke -name "*.log" 2>/dev/null | while read -r f; do  # each step's whole log (smoke.log has their ends)
    mkdir -p "$OUT/smoke-logs" && cp "$f" "$OUT/smoke-logs/$(echo "${f#/tmp/smoke/}" | tr / _)"
done
part bench16 200 python benchmarks/benchmark.py --images "$IMAGES" --batch-sizes 16 --workers 8 --no-tutorial-grid \
    "${FAST[@]}" --out "$OUT/bench16.json"
part e2e 300 python benchmarks/benchmark.py --images "$IMAGES" --end-to-end-only --epochs 20 --workers 8 \
    --project-args "-c configs/butterflies-fast.yaml" --out-dir "$OUT/e2e" --out "$OUT/e2e.json"
part bench64 150 python benchmarks/benchmark.py --images "$IMAGES" --batch-sizes 64 --workers 8 --grid-steps 0 \
    "${FAST[@]}" --out "$OUT/bench64.json"
echo "done after $SECONDS s" | tee -a "$OUT/summary.txt"
