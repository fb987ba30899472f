#!/usr/bin/env bash
# One device session's measurements, run detached and polled (a device call lasts at most 10 minutes):
#
#   setsid bash bench/gpu_session.sh OUT steps > OUT.log 2>&1 &   # ~10 min on an H200 (warm compile cache: less)
#   setsid bash bench/gpu_session.sh OUT smoke > OUT.log 2>&1 &   # ~25 min
#   setsid bash bench/gpu_session.sh OUT eval > OUT.log 2>&1 &    # ~5 min
#   setsid bash bench/gpu_session.sh OUT preset > OUT.log 2>&1 &  # ~10 min (bitsandbytes among the wheels)
#   setsid bash bench/gpu_session.sh OUT caps > OUT.log 2>&1 &    # ~8 min: the 46 GiB cap, three runs at once
#   EXTRA="--channels_last" setsid bash bench/gpu_session.sh OUT caps ...   # the same with a flag under trial
#   TINY=1 bash bench/gpu_session.sh OUT MODE                       # the same glue on a CPU, tiny (minutes)
#
# steps: the GPU tests (test_cuda_graph.py, test_checkpoints.py, ~1 min), bench/adamw.py (the update
#        alone by kernel, ~2 min), then bench/train_step.py in one process, alone on the GPU: the default (latent
#        cache; stage 1 also as its script runs it, s1-lc_cl_norm: --channels_last, run 29), and the compiled
#        24 GB preset, both stages (same-run ratios; each
#        configuration's peak per phase in the JSON; CONFIGS=a,b,... chooses others, e.g. s1-lc_model for the whole-model compile, run 27). With
#        CACHE_FROM=DIR... it starts from those compile caches (a preset or caps run's), merged. Then
#        bench/attention.py: each attention call of both steps under every kernel.
# smoke: bench/gpu_e2e.py (both scripts, stop, resume, converters) under a 46 GiB cap with validation on,
#        then stage-2 evaluation throughput on two 67-frame 480p videos (DAVIS val's mean length), VFID and
#        LPIPS on (bench/eval_assets.py: rule-filled I3D, random AlexNet).
# eval:  the same evaluation of random full-size weights in the released layout (~5 min).
# preset: at once, each under a 22 GiB cap: stage 1 and stage 2 (from the base UNet) through the scripts with
#        the 24 GB preset, compiled, validation and the latent cache on (their s/step are not clean: two
#        processes share the GPU).
# caps: at once on one GPU, each process capped (their peaks and GIFs hold; their s/step do not, three
#        processes share the GPU): stage 1 and stage 2 (from the base UNet) through the scripts under a 46 GiB
#        cap with validation, and bench/train_step.py's compiled 24 GB preset under a 22 GiB cap (its eager
#        FLOP count runs uncapped).
# OUT/times says when each part ended and its exit status; each part's output is OUT/<part>.log.
set -u
out=$(realpath -m "$1"); mode=$2
mkdir -p "$out"; cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
tiny=${TINY:+--tiny}
part() {  # part NAME COMMAND...: run, log, note the exit status
    local name=$1; shift
    "$@" > "$out/$name.log" 2>&1
    echo "$name rc=$? $(date -u +%H:%M:%S)" >> "$out/times"
}
shared_assets() {  # one copy of the weights and data, linked into OUT/s1 and OUT/s2
    part assets python3 -c "import sys; sys.path.insert(0, 'bench'); import gpu_e2e
gpu_e2e.write_assets('$out/assets', '$tiny' != '')"
    for d in s1 s2; do
        mkdir -p "$out/$d"
        ln -sfn "$out/assets/weights" "$out/$d/weights"
        ln -sfn "$out/assets/data" "$out/$d/data"
    done
}
evaluate() {  # evaluate STAGE2_WEIGHTS BASE_MODEL: eval_DiffuEraser_stage2.py on OUT/evaldata, VFID and LPIPS on
    part eval python3 eval_DiffuEraser_stage2.py --weights "mine=$1" --base_model_name_or_path "$2" \
        --videos "$out/evaldata/videos/JPEGImages/480p" --i3d_weights "$out/evaldata/i3d.pt" \
        --lpips_weights "$out/evaldata/alexnet.pth" --output_dir "$out/eval" "${evalsmall[@]}"
}
if [ -z "$tiny" ]; then evalsize=(--frames 67 --size 480x854); evalsmall=()  # DAVIS val's mean length, 480p
else evalsize=(--frames 12 --size 64x96); evalsmall=(--resolution 32 --steps 2 --nframes 4); fi
echo "start $mode $(date -u +%H:%M:%S)" >> "$out/times"
case $mode in
  steps)
    configs=${CONFIGS:-s1-latent_cache,s1-lc_cl_norm,s2-latent_cache,s1-24GB_compiled,s2-24GB_compiled}
    [ -n "$tiny" ] && configs=${CONFIGS:-s1-latent_cache,s2-latent_cache}  # bitsandbytes: GPU only
    if [ -n "${CACHE_FROM:-}" ]; then  # content-addressed entries: merging caches is safe
      mkdir -p "$out/compile_cache"
      for c in $CACHE_FROM; do  # a missing one only costs a cold compile: say so
        if [ -d "$c" ]; then cp -a --no-clobber "$c"/. "$out/compile_cache"/
        else echo "CACHE_FROM: no folder $c" >&2; fi
      done
      export TORCHINDUCTOR_CACHE_DIR=$out/compile_cache
    fi
    part gpu_tests python3 -m pytest -q tests/test_cuda_graph.py tests/test_checkpoints.py  # CPU: GPU ones skip
    [ -n "$tiny" ] || part adamw python3 bench/adamw.py --json "$out/adamw.json"
    part table python3 bench/train_step.py $tiny --configs $configs --json "$out/table.json"
    part attention python3 bench/attention.py $tiny --json "$out/attention.json" ;;  # ~1 min
  smoke)
    if [ -z "$tiny" ]; then e2e=(--extra "--memory_cap_gib 46"); else e2e=(--tiny); fi
    part e2e python3 bench/gpu_e2e.py "$out/e2e" "${e2e[@]}"
    part evaldata python3 bench/eval_assets.py "$out/evaldata" "${evalsize[@]}"
    evaluate "$out/e2e/converted/stage2" "$out/e2e/weights/sd" ;;
  eval)  # random full-size weights in the released layout: the evaluation's time without a training run first
    part evaldata python3 bench/eval_assets.py "$out/evaldata" "${evalsize[@]}" --weights "$([ -n "$tiny" ] && echo tiny || echo full)"
    evaluate "$out/evaldata/stage2" "$out/evaldata/base" ;;
  preset)  # at once, each capped; disk: one copy of the weights and data, no checkpoint kept
    if [ -z "$tiny" ]; then
      p=(--extra "--memory_cap_gib 22 --gradient_checkpointing --vae_batch_size 4")
      p1=("--extra1=--use_8bit_adam --channels_last 0")  # as train.md's preset line
    else
      p=(--tiny --extra "--gradient_checkpointing --vae_batch_size 4"); p1=()
    fi
    shared_assets
    part e2e_s1 python3 bench/gpu_e2e.py "$out/s1" --stage1_only --no_stop --no_convert "${p[@]}" "${p1[@]}" &
    part e2e_s2 python3 bench/gpu_e2e.py "$out/s2" --stage2_only --no_convert "${p[@]}" &
    wait ;;
  caps)  # three processes on one GPU, each capped; disk: ~56 GB at peak (one copy of the weights and data)
    if [ -z "$tiny" ]; then cap46=(--extra="--memory_cap_gib 46 ${EXTRA:-}"); else cap46=(--tiny --compile 0 --extra="${EXTRA:-}"); fi
    shared_assets
    part e2e_s1 python3 bench/gpu_e2e.py "$out/s1" --stage1_only --no_stop --no_convert "${cap46[@]}" &
    part e2e_s2 python3 bench/gpu_e2e.py "$out/s2" --stage2_only --no_convert "${cap46[@]}" &
    [ -z "$tiny" ] && part preset python3 bench/train_step.py --memory_cap_gib 22 \
        --configs s1-24GB_compiled,s2-24GB_compiled --json "$out/preset.json" &
    wait ;;
  *) echo "mode: steps, smoke, eval, preset or caps" >&2; exit 2 ;;
esac
echo "done $(date -u +%H:%M:%S)" >> "$out/times"
