#!/usr/bin/env bash
# One device session's measurements, run detached and polled (a device call lasts at most 10 minutes):
#
#   setsid bash bench/gpu_session.sh OUT steps > OUT.log 2>&1 &   # ~20 min on an H200
#   setsid bash bench/gpu_session.sh OUT smoke > OUT.log 2>&1 &   # ~25 min
#   setsid bash bench/gpu_session.sh OUT preset > OUT.log 2>&1 &  # ~25 min (bitsandbytes among the wheels)
#   setsid bash bench/gpu_session.sh OUT caps > OUT.log 2>&1 &    # ~25 min: smoke + preset at once, then stage 1's cache bench
#   TINY=1 bash bench/gpu_session.sh OUT steps                      # the same glue on a CPU, tiny (minutes)
#
# steps: the GPU tests, then bench/train_step.py side by side in one process each: the default against
#        --latent_cache (stage 1, stage 2), and the compiled 24 GB preset under a 22 GiB cap (both stages).
# smoke: bench/gpu_e2e.py (both scripts, stop, resume, converters) under a 46 GiB cap with validation on,
#        then stage-2 evaluation throughput on two 67-frame 480p videos (DAVIS val's mean length).
# preset: bench/gpu_e2e.py with the 24 GB preset, compiled, under a 22 GiB cap, validation on.
# caps: the GPU tests, bench/gpu_e2e.py --no_stop under a 46 GiB cap (default) and, at the same time on the
#        same GPU, under a 22 GiB cap (24 GB preset): each process is capped, so their peaks and GIFs hold;
#        their s/step do not (two runs share the GPU). Then, alone: the default against --latent_cache, stage 1, stage 2.
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
echo "start $mode $(date -u +%H:%M:%S)" >> "$out/times"
case $mode in
  steps)
    [ -z "$tiny" ] && part gpu_tests python3 -m pytest -q tests/test_cuda_graph.py tests/test_update.py
    part s1_cache python3 bench/train_step.py $tiny --configs s1-default,s1-latent_cache --json "$out/s1_cache.json"
    part s2_cache python3 bench/train_step.py $tiny --configs s2-default,s2-latent_cache --json "$out/s2_cache.json"
    if [ -z "$tiny" ]; then  # bitsandbytes: GPU only
      part preset python3 bench/train_step.py --memory_cap_gib 22 --configs s1-24GB_compiled,s2-24GB_compiled \
          --json "$out/preset.json"
    fi ;;
  smoke)
    if [ -z "$tiny" ]; then
      e2e=(--extra "--memory_cap_gib 46"); frames=67; size="(480, 854)"; small=()
    else
      e2e=(--tiny); frames=12; size="(64, 96)"; small=(--resolution 32 --steps 2 --nframes 4)
    fi
    part e2e python3 bench/gpu_e2e.py "$out/e2e" "${e2e[@]}"
    part evaldata python3 -c "from diffueraser.tiny import write_synthetic_davis as w
w('$out/evaldata', videos=('v0', 'v1'), nframes=$frames, size=$size)"
    part eval python3 eval_DiffuEraser_stage2.py --weights "mine=$out/e2e/converted/stage2" \
        --base_model_name_or_path "$out/e2e/weights/sd" --videos "$out/evaldata/JPEGImages/480p" \
        --output_dir "$out/eval" "${small[@]}" ;;
  preset)
    part e2e python3 bench/gpu_e2e.py "$out/e2e" \
        --extra "--memory_cap_gib 22 --gradient_checkpointing --use_8bit_adam --vae_batch_size 4" ;;
  caps)
    if [ -z "$tiny" ]; then
      part gpu_tests python3 -m pytest -q tests/test_cuda_graph.py tests/test_update.py &
      cap46=(--extra "--memory_cap_gib 46")
      cap22=(--extra "--memory_cap_gib 22 --gradient_checkpointing --vae_batch_size 4" --extra1 "--use_8bit_adam")
    else
      cap46=(--tiny --compile 0); cap22=(--tiny --compile 0 --extra "--gradient_checkpointing --vae_batch_size 1")
    fi
    part e2e46 python3 bench/gpu_e2e.py "$out/e2e46" --no_stop "${cap46[@]}" &
    part e2e22 python3 bench/gpu_e2e.py "$out/e2e22" --no_stop "${cap22[@]}" &
    wait
    part s1_cache python3 bench/train_step.py $tiny --configs s1-default,s1-latent_cache --json "$out/s1_cache.json"
    part s2_cache python3 bench/train_step.py $tiny --configs s2-default,s2-latent_cache --json "$out/s2_cache.json" ;;
  *) echo "mode: steps, smoke, preset or caps" >&2; exit 2 ;;
esac
echo "done $(date -u +%H:%M:%S)" >> "$out/times"
