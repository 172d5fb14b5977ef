#!/usr/bin/env bash
# Stages longer than one 10-minute command, without stopping and resuming them: `start` runs the stages of
# reproduce/gpu_session.sh (or of $STAGES_SCRIPT, e.g. reproduce/multi_gpu.sh) detached from the command (its own
# process session, so it outlives the command and runs on while the machine is held, i.e. while each next command
# follows within the machine's warm time); `watch` follows it from each command and packs what it wrote.
#
#   R=/tmp/work bash reproduce/detached.sh start STAGE...          # same environment as gpu_session.sh
#   AFTER=/tmp/work R=/tmp/work2 bash reproduce/detached.sh start STAGE...   # once the stages under AFTER ended
#   R=/tmp/work PACK=$OUT/r.tgz [ADAPTERS=$OUT/adapters.tgz] bash reproduce/detached.sh watch SECONDS
#   R=/tmp/work bash reproduce/detached.sh stop TEXT                 # end the started processes whose command has TEXT
#
# watch prints, every WATCH_EVERY seconds (default 60), the newest line of each log under $R/logs; it returns
# when the stages have ended (exit status 0) or after SECONDS (exit status 3: they still run), and packs $R
# into $PACK either way (reproduce/pack_dir.sh: checkpoints and weights left out, as gpu_session.sh packs); with
# ADAPTERS, also the adapters of the finished runs under ADAPTERS_FROM (default $R/seeds) that each is evaluated
# with (reproduce/pack_adapters.py), at most 16 MB: unpacked into $R in a later sitting, they are scored again
# without training again.
# stop kills (SIGKILL) only processes of the session `start` made, e.g. `stop seeds/newsfull` ends the newsfull
# runs and lets the others go on. Never `pkill -f TEXT` from a command instead: the command's own shell, and the
# machine's process that runs it, have TEXT in their command lines too, and die with it (the machine stops
# answering).
set -uo pipefail
cd "$(dirname "$0")/.."
R=${R:-/tmp/work}
export R
# the script whose stages `start` runs: gpu_session.sh, or multi_gpu.sh for the stages on several GPUs
export STAGES_SCRIPT=${STAGES_SCRIPT:-reproduce/gpu_session.sh}
mkdir -p "$R/logs"

case "${1:-}" in
  start)
    shift
    [ $# -gt 0 ] || { echo "detached.sh start: name at least one stage of $STAGES_SCRIPT"; exit 2; }
    rm -f "$R/detached.rc" "$R/detached.sid"
    # the shell in the new session leads it: its process id is the session's id, which `stop` looks for.
    # PACK is for watch: the first command's $OUT is gone by the time the stages end
    # AFTER: a measurement must not share the GPU with the stages started under another R, so wait for their end
    export AFTER=${AFTER:-}
    PACK='' setsid nohup bash -c 'echo $$ > "$R/detached.sid"
      while [ -n "$AFTER" ] && [ ! -f "$AFTER/detached.rc" ]; do sleep 5; done
      bash "$STAGES_SCRIPT" "$@"; echo $? > "$R/detached.rc"' \
      detached "$@" > "$R/logs/detached.out" 2>&1 < /dev/null &
    for _ in 1 2 3 4 5 6 7 8 9 10; do [ -s "$R/detached.sid" ] && break; sleep 0.2; done
    echo "started in the background: $* (output: $R/logs/detached.out)"
    ;;
  stop)
    text=${2:?detached.sh stop TEXT}
    [ -f "$R/detached.sid" ] || { echo "detached.sh stop: nothing was started under $R"; exit 2; }
    sid=$(cat "$R/detached.sid")
    # the session's processes only, less its leader (the stages' shell, which goes on to the next run or stage)
    pids=$(ps -e -o pid=,sid=,args= | awk -v sid="$sid" -v text="$text" -v me=$$ \
      '$2 == sid && $1 != sid && $1 != me && index($0, text) { print $1 }')
    [ -n "$pids" ] || { echo "detached.sh stop: no started process has '$text' in its command"; exit 1; }
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null
    echo "stopped $(echo $pids | wc -w) processes with '$text' in their command"
    ;;
  watch)
    limit=${2:?detached.sh watch SECONDS}
    # a machine that was released starts bare: waiting there would only spend GPU time on nothing
    [ -f "$R/detached.sid" ] || { echo "detached.sh watch: nothing was started under $R (a new machine starts with an empty /tmp)"; exit 2; }
    started=$SECONDS
    printed=$SECONDS
    status=3
    while true; do
      if [ -f "$R/detached.rc" ]; then
        echo "the stages ended (exit status $(cat "$R/detached.rc")) at $(date +%T)"
        status=0
        break
      fi
      [ $((SECONDS - started)) -ge "$limit" ] && break
      sleep 5
      [ $((SECONDS - printed)) -ge "${WATCH_EVERY:-60}" ] || continue
      printed=$SECONDS
      echo "--- $(date +%T)"
      for log in "$R"/logs/*.log; do
        [ -f "$log" ] || continue
        # progress bars rewrite their line with carriage returns: keep the newest state
        echo "$(basename "$log"): $(tail -c 400 "$log" | tr '\r' '\n' | grep -v '^\s*$' | tail -1)"
      done
    done
    if [ -n "${PACK:-}" ]; then
      source reproduce/pack_dir.sh
      pack_dir "$R" "$PACK" && echo "packed $R into $PACK"
    fi
    # the finished runs' adapters, for scoring them again in a later sitting (reproduce/pack_adapters.py)
    if [ -n "${ADAPTERS:-}" ] && [ -d "${ADAPTERS_FROM:-$R/seeds}" ]; then
      python3 reproduce/pack_adapters.py "${ADAPTERS_FROM:-$R/seeds}" "$ADAPTERS" || echo "adapters not packed"
    fi
    exit $status
    ;;
  *)
    echo "usage: detached.sh start STAGE... | detached.sh watch SECONDS | detached.sh stop TEXT"
    exit 2
    ;;
esac
