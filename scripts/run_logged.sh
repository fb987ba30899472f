# Sourced by finetune_stage{1,2}.sh.

# require_paths HINT PATH...: stop with the first missing path and what to set.
require_paths() {
  local hint=$1; shift
  for p in "$@"; do
    [ -e "$p" ] || { echo "missing: $p (set $hint)" >&2; exit 1; }
  done
}

# run_logged LOG COMMAND...: run COMMAND with its output appended to LOG and shown.
# Ctrl-C or `kill <script>` reach the trainer, which finishes its step, saves a checkpoint and
# exits cleanly; the launcher and tee ignore both signals, so they wait for it and log it all.
run_logged() {
  local log=$1; shift
  (trap '' INT TERM; exec "$@") > >(trap '' INT TERM; exec tee -a "$log") 2>&1 &
  local pid=$!
  trap "trap '' INT TERM; kill -TERM 0 2>/dev/null; wait $pid; exit \$?" TERM
  trap "trap '' INT TERM; wait $pid; exit \$?" INT
  wait $pid
}
