# Sourced by finetune_stage{1,2}.sh.

# require_paths HINT PATH...: stop with the first missing path and what to set.
require_paths() {
  local hint=$1; shift
  for p in "$@"; do
    [ -e "$p" ] || { echo "missing: $p (set $hint)" >&2; exit 1; }
  done
}

# run_logged LOG COMMAND...: run COMMAND with its output appended to LOG and shown.
# Ctrl-C or `kill <script>` reach only the trainer processes, which finish their step, save a
# checkpoint and exit cleanly (a second signal more than 5 s later stops them at once). The
# launcher runs in its own session and never sees a signal: accelerate launch (>= 1.16) and
# torchrun answer SIGTERM/SIGINT by killing their workers 5-30 s later, mid-save.
run_logged() {
  local log=$1; shift
  (trap '' INT TERM; exec setsid "$@") > >(trap '' INT TERM; exec tee -a "$log") 2>&1 &
  local pid=$! status=0
  trap "stop_trainers TERM $pid" TERM
  trap "stop_trainers INT $pid" INT
  while :; do  # a trapped signal ends `wait` early: wait again until the launcher is gone
    status=0
    wait "$pid" || status=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  trap - INT TERM
  return "$status"
}

# stop_trainers SIGNAL LAUNCHER_PID: pass the signal to the launcher's children, the training
# processes. Before it has started any there is nothing to save: end the launcher's session
# (setsid made the launcher its group leader).
stop_trainers() {
  echo "signal $1: passed to the trainer (it saves a checkpoint after this step, then stops)" >&2
  pkill "-$1" -P "$2" || kill -KILL -- "-$2" 2>/dev/null || kill -KILL "$2" 2>/dev/null || true
}
