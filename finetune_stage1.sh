#!/usr/bin/env bash
# Stage 1 of DiffuEraser finetuning: UNet + BrushNet, 10 frames at 512.
# Every path can be set from the environment, e.g.  WEIGHTS=/data/weights DAVIS=/data/DAVIS bash finetune_stage1.sh
# Extra arguments are passed to the training script, e.g.  bash finetune_stage1.sh --max_train_steps 100
# (they come last and win: --channels_last 0 turns off the channels-last nets, 1.06x on an H200, ~1 GiB more)
set -euo pipefail
REPO=$(cd "$(dirname "$0")" && pwd)   # paths below stay relative to where you run it
source "$REPO/scripts/run_logged.sh"
WEIGHTS=${WEIGHTS:-weights}
BASE_MODEL=${BASE_MODEL:-$WEIGHTS/stable-diffusion-v1-5}
VAE=${VAE:-$WEIGHTS/sd-vae-ft-mse}
DAVIS=${DAVIS-data/DAVIS}                      # DAVIS= (empty): not used; then give --csv_file / --frames_root
YTBV=${YTBV-data/YTBV}                         # YTBV= (empty): not used
OUTPUT_DIR=${OUTPUT_DIR:-finetune-stage1}
PRETRAINED_STAGE1=${PRETRAINED_STAGE1:-}        # e.g. $WEIGHTS/diffuEraser to start from the released weights
LATENT_CACHE=${LATENT_CACHE-latent_cache}      # clean frames' VAE moments, both stages (~6.5 GB, train.md); empty: off
MIXED_PRECISION=${MIXED_PRECISION:-fp16}           # bf16 on Ampere+ (no loss scaling needed), no = fp32
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-}        # e.g. configs/accelerate_multigpu.yaml
NUM_PROCESSES=${NUM_PROCESSES:-}                # GPUs (accelerate launch --num_processes); empty: the config's, else every GPU
VAL_IMAGES=${VAL_IMAGES:-"['$DAVIS/JPEGImages/480p/bear', '$DAVIS/JPEGImages/480p/boat']"}
VAL_MASKS=${VAL_MASKS:-"['$DAVIS/Annotations/480p/bear', '$DAVIS/Annotations/480p/boat']"}

require_paths "WEIGHTS, BASE_MODEL, VAE, DAVIS, YTBV, PRETRAINED_STAGE1 or ACCELERATE_CONFIG" \
  "$BASE_MODEL" "$VAE" ${DAVIS:+"$DAVIS"} ${YTBV:+"$YTBV"} ${PRETRAINED_STAGE1:+"$PRETRAINED_STAGE1"} ${ACCELERATE_CONFIG:+"$ACCELERATE_CONFIG"}
mkdir -p "$OUTPUT_DIR"
LOG="$OUTPUT_DIR/train_stage1.log"
echo "logging to $LOG"

# Ctrl-C or `kill <this script>`: the trainer saves a checkpoint and exits cleanly.
run_logged "$LOG" accelerate launch ${ACCELERATE_CONFIG:+--config_file "$ACCELERATE_CONFIG"} ${NUM_PROCESSES:+--num_processes "$NUM_PROCESSES"} --mixed_precision "$MIXED_PRECISION" \
  "$REPO/train_DiffuEraser_stage1.py" \
  --base_model_name_or_path "$BASE_MODEL" \
  --vae_path "$VAE" \
  ${PRETRAINED_STAGE1:+--pretrained_stage1_path "$PRETRAINED_STAGE1"} \
  ${DAVIS:+--davis_root "$DAVIS"} \
  ${YTBV:+--ytvos_root "$YTBV"} \
  --output_dir "$OUTPUT_DIR" \
  ${LATENT_CACHE:+--latent_cache "$LATENT_CACHE"} \
  --mixed_precision "$MIXED_PRECISION" \
  --channels_last 1 \
  --resolution 512 \
  --nframes 10 \
  --learning_rate 5e-06 \
  --train_batch_size 1 \
  --dataloader_num_workers 4 \
  --checkpointing_steps 2000 \
  --checkpoints_total_limit 5 \
  --validation_steps 2000 \
  --validation_prompt "['clean background', 'clean background']" \
  --validation_image "$VAL_IMAGES" \
  --validation_mask "$VAL_MASKS" \
  --max_train_steps 50000 \
  --seed 42 \
  --resume_from_checkpoint latest \
  --report_to tensorboard \
  "$@"
