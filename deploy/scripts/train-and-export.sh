#!/bin/sh
# The trainer image's entry point (docker compose's `trainer` service): train a model, export it, and
# publish the bundle into $BUNDLE_DIR by renaming whole folders, so that the server never sees half a
# bundle (between the two renames, for a moment, it sees none: a start then fails and is retried).
# Settings come from the environment; arguments are passed on to vae-train.
set -eu

MODEL="${VAE_TRAIN_MODEL:-vae}"
DATASET="${VAE_TRAIN_DATASET:-mnist-5k}"
LATENT_DIM="${VAE_TRAIN_LATENT_DIM:-16}"
EPOCHS="${VAE_TRAIN_EPOCHS:-30}"
DEVICE="${VAE_TRAIN_DEVICE:-auto}"
RUN_DIR="${VAE_TRAIN_RUN_DIR:-/work/run}"
BUNDLE_DIR="${BUNDLE_DIR:-/models/vae}"
# The name vae-serve reports (GetModelInfo, vae_model_info); the version is a hash of the graphs.
NAME="${VAE_MODEL_NAME:-$MODEL-$DATASET}"
# A bundle already there is kept unless asked otherwise: `docker compose up` then restarts in seconds.
RETRAIN="${VAE_RETRAIN:-0}"

if [ -f "$BUNDLE_DIR/model.json" ] && [ "$RETRAIN" != "1" ]; then
    echo "train-and-export: $BUNDLE_DIR/model.json exists; keeping it (set VAE_RETRAIN=1 to train again)"
    exit 0
fi

# As PID 1 in its container, sh ignores SIGTERM, and `docker compose stop` would wait out its grace
# period and kill it: stop the step that runs instead, and exit as the signal says.
step=
stop() {
    if [ -n "$step" ]; then
        kill -TERM "$step" 2>/dev/null || true
        wait "$step" || true
    fi
    exit "$1"
}
trap 'stop 143' TERM
trap 'stop 130' INT
run() {
    "$@" &
    step=$!
    wait "$step"
    step=
}

rm -rf "$RUN_DIR"
run vae-train --model "$MODEL" --dataset "$DATASET" --latent-dim "$LATENT_DIM" --epochs "$EPOCHS" \
    --device "$DEVICE" --no-progress --out "$RUN_DIR" "$@"

staging="$BUNDLE_DIR.staging"
rm -rf "$staging"
run vae-export "$RUN_DIR" --out "$staging" --name "$NAME"
trap '' TERM INT  # the renames that publish it are not cut half-way
rm -rf "$BUNDLE_DIR.previous"
if [ -d "$BUNDLE_DIR" ]; then
    mv "$BUNDLE_DIR" "$BUNDLE_DIR.previous"
fi
mv "$staging" "$BUNDLE_DIR"
echo "train-and-export: bundle ready in $BUNDLE_DIR"
