#!/usr/bin/env bash
# Stage 2 of DiffuEraser finetuning: motion modules only, 22 frames at 512.
# Needs the converted stage-1 weights (python save_checkpoint_stage1.py).
# Every path can be set from the environment, e.g.  STAGE1=/data/stage1 bash finetune_stage2.sh
# MOTION_ADAPTER may name a released DiffuEraser stage-2 unet_main/ to start from its motion modules.
set -euo pipefail
REPO=$(cd "$(dirname "$0")" && pwd)   # paths below stay relative to where you run it
source "$REPO/scripts/run_logged.sh"
WEIGHTS=${WEIGHTS:-weights}
BASE_MODEL=${BASE_MODEL:-$WEIGHTS/stable-diffusion-v1-5}
VAE=${VAE:-$WEIGHTS/sd-vae-ft-mse}
MOTION_ADAPTER=${MOTION_ADAPTER:-$WEIGHTS/animatediff-motion-adapter-v1-5-2}
STAGE1=${STAGE1:-converted_weights/diffuEraser-model-stage1}
DAVIS=${DAVIS-data/DAVIS}                      # DAVIS= (empty): not used; then give --csv_file / --frames_root
YTBV=${YTBV-data/YTBV}                         # YTBV= (empty): not used
OUTPUT_DIR=${OUTPUT_DIR:-finetune-stage2}
LATENT_CACHE=${LATENT_CACHE-latent_cache}      # clean frames' VAE moments, both stages (~6.5 GB, train.md); empty: off
MIXED_PRECISION=${MIXED_PRECISION:-fp16}           # bf16 on Ampere+ (no loss scaling needed), no = fp32
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-}        # e.g. configs/accelerate_multigpu.yaml
NUM_PROCESSES=${NUM_PROCESSES:-}                # GPUs (accelerate launch --num_processes); empty: the config's, else every GPU
VAL_IMAGES=${VAL_IMAGES:-"['$DAVIS/JPEGImages/480p/bear', '$DAVIS/JPEGImages/480p/boat']"}
VAL_MASKS=${VAL_MASKS:-"['$DAVIS/Annotations/480p/bear', '$DAVIS/Annotations/480p/boat']"}

require_paths "WEIGHTS, BASE_MODEL, VAE, MOTION_ADAPTER, STAGE1, DAVIS, YTBV or ACCELERATE_CONFIG" \
  "$BASE_MODEL" "$VAE" "$MOTION_ADAPTER" "$STAGE1" ${DAVIS:+"$DAVIS"} ${YTBV:+"$YTBV"} ${ACCELERATE_CONFIG:+"$ACCELERATE_CONFIG"}
mkdir -p "$OUTPUT_DIR"
LOG="$OUTPUT_DIR/train_stage2.log"
echo "logging to $LOG"

# Ctrl-C or `kill <this script>`: the trainer saves a checkpoint and exits cleanly.
run_logged "$LOG" accelerate launch ${ACCELERATE_CONFIG:+--config_file "$ACCELERATE_CONFIG"} ${NUM_PROCESSES:+--num_processes "$NUM_PROCESSES"} --mixed_precision "$MIXED_PRECISION" \
  "$REPO/train_DiffuEraser_stage2.py" \
  --base_model_name_or_path "$BASE_MODEL" \
  --vae_path "$VAE" \
  --pretrained_stage1 "$STAGE1" \
  --motion_adapter_path "$MOTION_ADAPTER" \
  ${DAVIS:+--davis_root "$DAVIS"} \
  ${YTBV:+--ytvos_root "$YTBV"} \
  --output_dir "$OUTPUT_DIR" \
  ${LATENT_CACHE:+--latent_cache "$LATENT_CACHE"} \
  --mixed_precision "$MIXED_PRECISION" \
  --resolution 512 \
  --nframes 22 \
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
