#!/usr/bin/env bash
# `make demo`: the whole chain on generated chest X-rays, no data needed. Phantoms -> CheXpert-layout CSV + JPEGs ->
# shards -> SimCLR pretraining -> linear probes (SimCLR encoder and random init) -> paired bootstrap -> report.
# CPU: a ResNet-18 at 48 px, 600 steps in bf16 (about 8 min on 2 cores); GPU: ResNet-50 at 224 px, batch 256.
# Fails loudly unless the SimCLR encoder beats random init with the 95% CI of the mean-AUROC difference above 0.
# Knobs (environment): DEMO_DIR, DEMO_IMAGES, DEMO_STEPS, DEMO_DEVICE=cpu|gpu, DEMO_PRECISION=bf16|fp32 (CPU),
# DEMO_SEED.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
DEMO=${DEMO_DIR:-runs/demo}
SEED=${DEMO_SEED:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
START=$(date +%s)

fail() { echo "demo: FAILED at ${STAGE:-setup}: $*" >&2; exit 1; }
STAGE_TIMES=()
stage_end() { [ -z "${STAGE_T0:-}" ] || STAGE_TIMES+=("$(( $(date +%s) - STAGE_T0 ))s ${STAGE%%:*}"); }
stage() { stage_end; STAGE="$1"; STAGE_T0=$(date +%s); echo; echo "== [$(( STAGE_T0 - START ))s] $1"; }
need() {  # a stage that another part of the project provides, checked before any work starts
    "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null \
        || fail "stage '$2' is missing: module $1 is not in this checkout (no results were faked)"
}
DEVICE=${DEMO_DEVICE:-$("$PY" -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')" 2>/dev/null \
    || echo none)}
[ "$DEVICE" != none ] || fail "$PY cannot import torch (run \`make demo\`, which installs into .venv first)"
need synth.dataset "ingest synth"
need ingest.build "ingest build-shards"
need dali_pipes "dali_pipes loaders"
need trainer.data "trainer/pretrain.py"
[ -f trainer/pretrain.py ] || fail "stage 'pretrain' is missing: trainer/pretrain.py not found"
need eval.cli "python -m eval"

if [ "$DEVICE" = gpu ]; then
    N=${DEMO_IMAGES:-10000}; SYNTH_PX=256; SHARD_PX=256; IMAGE=224; ARCH=resnet50; BATCH=256
    STEPS=${DEMO_STEPS:-1200}; WARMUP=100; EVAL_BATCH=256
    CONFIG=trainer/configs/simclr_r50_chexpert.toml
    TRAIN_ARGS=(data.views=all run.log_every=50 run.ckpt_every=100000 run.monitor_every=100)
else
    # AdamW rather than LARS: at a few hundred steps it gets much further (LARS pays off at large batch, long runs)
    # phantoms rendered at 96 px (about 40 % less render time than 128 px): the shards keep 72 px either way
    N=${DEMO_IMAGES:-3000}; SYNTH_PX=96; SHARD_PX=72; IMAGE=48; ARCH=resnet18; BATCH=128
    STEPS=${DEMO_STEPS:-600}; WARMUP=25; EVAL_BATCH=128
    CONFIG=trainer/configs/debug_cpu.toml
    # bf16 autocast where the CPU has bf16 instructions (AVX512-BF16 / AMX): the step runs ~1.8x faster than fp32;
    # without those instructions oneDNN emulates bf16 and it does not pay, so fp32 there
    PRECISION=${DEMO_PRECISION:-$(grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null && echo bf16 || echo fp32)}
    TRAIN_ARGS=(run.precision="$PRECISION" data.num_threads="$OMP_NUM_THREADS"
                optim.name=adamw optim.base_lr=0.001 optim.lr_scaling=none
                optim.weight_decay=0.0001 model.head_hidden_dim=0 model.proj_dim=128
                run.deterministic=false run.log_every=25 run.ckpt_every=100000 run.monitor_every=100)
fi
echo "demo: $DEVICE | $N phantom images | SimCLR $ARCH at ${IMAGE}px, batch $BATCH, $STEPS steps," \
     "${PRECISION:-bf16} | output $DEMO"
TRAIN_ARGS+=(data.shards="$DEMO/shards" data.image_size="$IMAGE" data.batch_size="$BATCH" model.arch="$ARCH"
             optim.total_steps="$STEPS" optim.warmup_steps="$WARMUP" run.seed="$SEED" run.out="$DEMO/run")

case "$DEMO" in ""|/|.|..|"$HOME") fail "DEMO_DIR='$DEMO' would delete more than the demo's own folder";; esac
rm -rf "$DEMO"   # the demo's own folder: every run starts fresh
mkdir -p "$DEMO/report"

stage "ingest synth: $N procedural chest X-ray phantoms in the CheXpert-v1.0-small layout"
"$PY" -m ingest synth --out "$DEMO/raw" --n "$N" --size "$SYNTH_PX" --seed "$SEED" --valid-frac 0.15 \
    --preview "$DEMO/report/phantoms.png" || fail "ingest synth exited $?"

stage "ingest build-shards --source chexpert (valid.csv patients become the test split)"
"$PY" -m ingest build-shards --source chexpert --root "$DEMO/raw/CheXpert-v1.0-small" --out "$DEMO/shards" \
    --size "$SHARD_PX" --val-frac 0.1 --no-progress || fail "ingest build-shards exited $?"

stage "augmented views the encoder will see"
"$PY" scripts/demo_views.py "$CONFIG" "$DEMO/report/views.png" "${TRAIN_ARGS[@]}" || fail "demo_views exited $?"

stage "SimCLR pretraining ($ARCH, ${IMAGE}px, $STEPS steps)"
"$PY" trainer/pretrain.py "$CONFIG" "${TRAIN_ARGS[@]}" || fail "trainer/pretrain.py exited $?"
[ -f "$DEMO/run/encoder.pt" ] || fail "pretraining finished without $DEMO/run/encoder.pt"

stage "linear probes on frozen features: SimCLR encoder and random init (CheXpert competition tasks)"
"$PY" -m eval linear --out "$DEMO/eval" --shards "$DEMO/shards" --encoder "$DEMO/run/encoder.pt" --init random \
    --arch "$ARCH" --tasks chexpert5 --device "$DEVICE" --image-size "$IMAGE" --batch-size "$EVAL_BATCH" \
    --seed "$SEED" || fail "eval linear exited $?"

stage "paired patient bootstrap: SimCLR - random init"
"$PY" -m eval compare --out "$DEMO/eval" --a run --b "random-$ARCH" --seed "$SEED" || fail "eval compare exited $?"
"$PY" -m eval report --out "$DEMO/eval" || fail "eval report exited $?"

stage "verdict"
"$PY" scripts/demo_report.py "$DEMO" run "random-$ARCH" \
    || fail "the SimCLR encoder did not beat random init (see above)"

stage "export the SimCLR encoder's linear probes as a bundle (weights, thresholds on val, model card)"
"$PY" -m eval export --out "$DEMO/eval" --encoder run --protocol linear --bundle "$DEMO/bundle" \
    || fail "eval export exited $?"
echo "demo: bundle $DEMO/bundle (model card: $DEMO/bundle/README.md); serve it with:"
echo "    $PY -m serve --bundle $DEMO/bundle --neighbours $DEMO/shards    # then open http://127.0.0.1:8000/"
stage_end
echo "demo: done in $(( $(date +%s) - START )) s; per stage: $(printf '%s | ' "${STAGE_TIMES[@]}")"
