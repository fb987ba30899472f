# Sourced by finetune_stage{1,2}.sh.

# require_paths HINT PATH...: stop with the first missing path and what to set.
require_paths() {
  local hint=$1; shift
  for p in "$@"; do
    [ -e "$p" ] || { echo "missing: $p (set $hint)" >&2; exit 1; }
  done
}

# run_logged LOG COMMAND...: run COMMAND with its output appended to LOG and shown.
# Ctrl-C, `kill <script>` or a closed terminal reach only the trainer processes, which finish
# their step, save a checkpoint and exit cleanly (a second signal more than 5 s later stops them at
# once). The launcher runs in its own session and never sees a signal: accelerate launch (>= 1.16)
# and torchrun answer SIGTERM/SIGINT by killing their workers 5-30 s later, mid-save. A stop before
# training started ends the run at once with nothing saved, status 0 as well. The trainers inherit
# INT/TERM ignored (from the trap below, and `&` without job control ignores INT): they set their
# own handlers first thing (diffueraser/stopping.py).
run_logged() {
  local log=$1 status=0 tee_pid; shift
  set +m  # no job control: setsid must not fork, so the launcher stays this shell's child
  exec 3> >(trap '' INT TERM HUP; exec tee -a "$log")  # tee: this shell's child, not the launcher's
  tee_pid=$!
  RUN_LOGGED_PID='' RUN_LOGGED_SIGNAL='' RUN_LOGGED_KILLED=''
  trap 'stop_trainers TERM' TERM HUP
  trap 'stop_trainers INT' INT
  (trap '' INT TERM; exec setsid "$@") >&3 2>&3 &
  RUN_LOGGED_PID=$!
  [ -z "$RUN_LOGGED_SIGNAL" ] || stop_trainers "$RUN_LOGGED_SIGNAL"  # one that came before the line above
  while :; do  # a trapped signal ends `wait` early: wait again until the launcher is gone
    wait "$RUN_LOGGED_PID" && status=0 || status=$?
    kill -0 "$RUN_LOGGED_PID" 2>/dev/null || break
  done
  wait "$RUN_LOGGED_PID" 2>/dev/null && status=0 || { local s=$?; [ "$s" -eq 127 ] || status=$s; }  # reaped in a trap
  [ -z "$RUN_LOGGED_KILLED" ] || status=0  # stopped before any trainer started: a clean stop
  trap - INT TERM HUP
  exec 3>&-
  wait "$tee_pid" 2>/dev/null || true  # the log holds every line before the script ends
  return "$status"
}

# stop_trainers SIGNAL: pass SIGNAL to the launcher's children, the training processes. Before it
# has started any there is nothing to save: end the launcher's session (setsid made it the leader).
stop_trainers() {
  if [ -z "$RUN_LOGGED_PID" ]; then RUN_LOGGED_SIGNAL=$1; return 0; fi
  if signal_children "$1" "$RUN_LOGGED_PID"; then
    echo "signal $1: passed to the trainer (it saves a checkpoint after this step, then stops)" >&2 || true
    return 0
  fi
  echo "signal $1: stopped before the trainer started (nothing to save)" >&2 || true
  RUN_LOGGED_KILLED=1
  kill -KILL -- "-$RUN_LOGGED_PID" 2>/dev/null || kill -KILL "$RUN_LOGGED_PID" 2>/dev/null || true
}

# signal_children SIGNAL PID: send SIGNAL to PID's children; false if it has none.
signal_children() {
  if command -v pkill >/dev/null; then
    pkill "-$1" -P "$2"
  else
    local kids
    kids=$(cat /proc/"$2"/task/*/children 2>/dev/null) || true
    [ -n "$kids" ] && kill "-$1" $kids 2>/dev/null
  fi
}
