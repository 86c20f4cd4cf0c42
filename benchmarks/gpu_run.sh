#!/usr/bin/env bash
# The GPU measurements in two calls on a lent GPU machine (see benchmarks/README.md, "One GPU lease").
#
#   bash benchmarks/gpu_run.sh prepare   # here, with network: wheels into .whl/, 750 photos into ddpm-heliconius/
#   CALL=1 bash benchmarks/gpu_run.sh    # there, first call: the fastest config's start-up, its resume, batch 16
#   CALL=2 bash benchmarks/gpu_run.sh    # there, second call: end to end, batch 64
#   CALL=3 bash benchmarks/gpu_run.sh    # there, third call: quality per recipe (FID scored here afterwards)
#   CALL=4 bash benchmarks/gpu_run.sh    # there, fourth call: post-hoc EMA of the third call's run (FID here too)
#   CPU=1 CALL=1 bash benchmarks/gpu_run.sh   # on a CPU: the same parts in their tiny CPU modes (checks the script)
#
# Parts, each started only if its usual time still fits in BUDGET seconds (default 540), and cut off at the budget:
#   CALL=1  fast     gpu_smoke.py on the fastest config (SMOKE_CONFIGS, default butterflies-fast): a fit with
#                    cold caches, its resume (warm: inductor's cache beside the checkpoints), sample, export
#           bench16  benchmark.py, batch 16: tutorial nw=8, butterflies.yaml, + butterflies-fast.yaml, their
#                    DDPM-1000 and DDIM-50 grids
#   CALL=2  e2e      benchmark.py --end-to-end-only: 20 epochs on the 750 photos, tutorial nw=8 and
#                    butterflies-fast.yaml, each from process start to its last file
#           bench64  benchmark.py, batch 64, no grids (the MFU figure)
#   CALL=3  quality  quality.py on butterflies.yaml at 128 px: the tutorial's recipe and v + min-SNR, 900 and 300
#                    steps each, held-out val/loss, post-hoc EMA kept (it does not change the training: CALL=4
#                    scores it); their samples come back as zips in $OUT/samples/ and are scored
#                    here (the FID network, 83 MiB, cannot travel): python benchmarks/quality.py --score
#                    <files_at>/quality.json --samples-dir <files_at>/samples
#                    Its rows also give butterflies.yaml's measurement cost / training time (the row RESULTS.md
#                    lacks): its end-of-run measurement draws 2,048 DPM-Solver++ 20 samples, 8 x a row's sample_s
#                    (256 samples, 100 at a time), against 3,150 training steps, 3.5 x the 900-step row's train_s.
#   CALL=4  posthoc  quality.py on CALL=3's 900-step v + min-SNR run (--reuse-runs: trained again only on a fresh
#                    machine): its raw weights again and its post-hoc EMA at lengths 0.05, 0.1 and 0.2, deferred FID
#                    as CALL=3's (--score <files_at>/posthoc.json). A call of its own: CALL=3 brings back 8 files
#                    already, the most a call brings back, and 4 more zips of 256 samples at 128 px (about 6 MB
#                    each, as the photos' PNGs at 128 px) would not fit its 64 MiB either.
#   also:   smoke    gpu_smoke.py over every shipped config (401 s on an H200: a lease of its own)
# PARTS="e2e bench64" picks parts by name instead of CALL. The smoke parts' whole per-step logs come back in
# $OUT/smoke-logs/ (each holds its run summary: start-up, training, epoch ends).
set -u
cd "$(dirname "$0")/.."
IMAGES=${IMAGES:-ddpm-heliconius}
VAL_IMAGES=${VAL_IMAGES:-ddpm-heliconius-val}  # the 200 val photos: the end-to-end row's held-out val/loss
WHEELS=(diffusers==0.42.1 datasets==5.2.0 jsonargparse==4.53.0 torchdata==0.11.0 dill==0.4.1 multiprocess==0.70.19
        importlib_metadata==10.2.0 docstring-parser==0.18.0 typeshed-client==2.15.0 importlib_resources==7.1.0)

if [ "${1:-}" = prepare ]; then
    set -e
    pip download --no-deps --only-binary=:all: --python-version 3.12 --dest .whl "${WHEELS[@]}"
    rm -rf "$IMAGES" && mkdir -p "$IMAGES"
    ls ../shared/data/heliconius/train | sort | head -750 | while read -r f; do
        cp "../shared/data/heliconius/train/$f" "$IMAGES/"
    done
    rm -rf "$VAL_IMAGES" && cp -r ../shared/data/heliconius/val "$VAL_IMAGES"
    du -sh .whl "$IMAGES" "$VAL_IMAGES"
    exit 0
fi

OUT=${OUT:-/tmp/gpu-run}
BUDGET=${BUDGET:-540}
CALL=${CALL:-1}
case $CALL in
    1) DEFAULT_PARTS="fast bench16" ;;
    2) DEFAULT_PARTS="e2e bench64" ;;
    3) DEFAULT_PARTS="quality" ;;
    4) DEFAULT_PARTS="posthoc" ;;
    *) echo "CALL must be 1, 2, 3 or 4, not $CALL" >&2; exit 2 ;;
esac
PARTS=${PARTS:-$DEFAULT_PARTS}
WORK=${WORK:-/tmp/gpu-run-work}
mkdir -p "$OUT" "$WORK"
if [ -d .whl ]; then
    # its log in $WORK: $OUT brings back 8 files at most, and the quality call needs them all
    pip install --quiet --no-index --no-deps --target /tmp/site .whl/*.whl > "$WORK/pip.log" 2>&1 \
        || { cp "$WORK/pip.log" "$OUT/"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi || true; python -c "import sys, torch, lightning, diffusers, datasets; print(sys.version); \
print(torch.__version__, torch.version.cuda, lightning.__version__, diffusers.__version__, datasets.__version__)"; \
} > "$OUT/env.txt" 2>&1

SMOKE_MODE=() BENCH_MODE=()
QUALITY_MODE=(-c configs/butterflies.yaml --num-samples 256 --samplers dpmsolver++-20)
QUALITY_STEPS=900,300 POSTHOC_STEPS=900
# a warm-up that a 300-step run gets through, and a 20-step end-of-run grid (butterflies.yaml's is DDPM-1000);
# post-hoc EMA snapshots every 100 steps: 2 x 9 of 228 MB (float16) for a 900-step run, 11 GB for the 4 runs
QUALITY_FIT="--data.dataset $IMAGES --model.lr_warmup_steps 100 --grid.sampler dpmsolver++ --grid.num_inference_steps 20"
QUALITY_FIT+=" --posthoc_ema.enabled true --posthoc_ema.every_n_steps 100"
if [ "${CPU:-0}" = 1 ]; then  # the scripts' own CPU modes: tiny UNet, a few steps; the numbers mean nothing
    SMOKE_MODE=(--cpu) BENCH_MODE=(--tiny)
    [ -d "$IMAGES" ] || IMAGES=../shared/data/heliconius/train
    [ -d "$VAL_IMAGES" ] || VAL_IMAGES=../shared/data/heliconius/val
    QUALITY_MODE=(--num-samples 4 --samplers dpmsolver++-2)  # tiny.yaml
    QUALITY_STEPS=4,2 POSTHOC_STEPS=4
    QUALITY_FIT="--data.dataset $IMAGES --data.image_size 16 --data.num_workers 0 --grid.num_inference_steps 2"
    QUALITY_FIT+=" --posthoc_ema.enabled true --posthoc_ema.every_n_steps 1"
fi
VAL=$([ -d "$VAL_IMAGES" ] && echo "$VAL_IMAGES")  # none carried: the end-to-end row goes without its val/loss

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

keep_smoke_logs() {  # each step's whole log (the part's own log has their ends)
    find "$WORK/$1" -name "*.log" 2>/dev/null | while read -r f; do
        mkdir -p "$OUT/smoke-logs" && cp "$f" "$OUT/smoke-logs/$1-$(echo "${f#"$WORK/$1/"}" | tr / _)"
    done
}

# The seconds each part needs, from the last H200 runs (benchmarks/README.md, "One GPU lease"): part() skips a part
# that no longer fits rather than have the call cut off in its middle.
part fast 300 python benchmarks/gpu_smoke.py "${SMOKE_MODE[@]}" --images "$IMAGES" --work-dir "$WORK/fast" \
    --configs "${SMOKE_CONFIGS:-butterflies-fast}"
keep_smoke_logs fast
part smoke 400 python benchmarks/gpu_smoke.py "${SMOKE_MODE[@]}" --images "$IMAGES" --work-dir "$WORK/smoke" \
    ${SMOKE_CONFIGS:+--configs "$SMOKE_CONFIGS"}
keep_smoke_logs smoke
# The benchmark rows start warm from the fast part's compile cache where there is one (their start-up is not the
# cold figure: that is the fast part's fit); otherwise inductor's default.
CACHE=$(find "$WORK/fast" -type d -name compile-cache 2>/dev/null | head -1)
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-${CACHE:-$WORK/compile-cache}}
FAST=(--project-args "" --project-args "-c configs/butterflies-fast.yaml")
part bench16 200 python benchmarks/benchmark.py "${BENCH_MODE[@]}" --images "$IMAGES" --batch-sizes 16 --workers 8 \
    --no-tutorial-grid "${FAST[@]}" --out "$OUT/bench16.json"
part e2e 300 python benchmarks/benchmark.py "${BENCH_MODE[@]}" --images "$IMAGES" --end-to-end-only --epochs 20 \
    --workers 8 --project-args "-c configs/butterflies-fast.yaml" --out-dir "$OUT/e2e" --out "$OUT/e2e.json" \
    ${VAL:+--val-images "$VAL"}
part bench64 150 python benchmarks/benchmark.py "${BENCH_MODE[@]}" --images "$IMAGES" --batch-sizes 64 --workers 8 \
    --grid-steps 0 "${FAST[@]}" --out "$OUT/bench64.json"
# 2 x (900 + 300) steps at about 8 steps/s (the tutorial loop ran 129-169 images/s at batch 16 on an H200), with
# a fit's start-up and 256 DPM-Solver++ samples each: an estimate, no quality run has been on a GPU yet.
QUALITY_FIT+=" --trainer.enable_progress_bar false --trainer.enable_model_summary false"
part quality 420 python benchmarks/quality.py "${QUALITY_MODE[@]}" --steps $QUALITY_STEPS --variants tutorial,v+min-snr \
    --fit-args "$QUALITY_FIT" --val-dataset "${VAL:-$IMAGES}" --val-split train --out-dir "$WORK/quality" \
    --defer-fid --samples-dir "$OUT/samples" --out "$OUT/quality.json"
# 4 x 256 samples from the quality part's run (an estimate: 60 s each with the reconstruction); a fresh machine
# trains it again first (about 2 minutes)
part posthoc 300 python benchmarks/quality.py "${QUALITY_MODE[@]}" --steps $POSTHOC_STEPS --variants v+min-snr \
    --posthoc-lengths 0.05,0.1,0.2 --reuse-runs --fit-args "$QUALITY_FIT" --val-dataset "${VAL:-$IMAGES}" \
    --val-split train --out-dir "$WORK/quality" --defer-fid --samples-dir "$OUT/samples" --out "$OUT/posthoc.json"
echo "done after $SECONDS s" | tee -a "$OUT/summary.txt"
