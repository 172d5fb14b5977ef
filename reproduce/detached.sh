#!/usr/bin/env bash
# Stages longer than one 10-minute command, without stopping and resuming them: `start` runs
# reproduce/gpu_session.sh detached from the command (its own process session, so it outlives the command and
# runs on while the machine is held, i.e. while each next command follows within the machine's warm time);
# `watch` follows it from each command and packs what it wrote.
#
#   R=/tmp/work bash reproduce/detached.sh start STAGE...          # same environment as gpu_session.sh
#   R=/tmp/work PACK=$OUT/r.tgz bash reproduce/detached.sh watch SECONDS
#
# watch prints, every WATCH_EVERY seconds (default 60), the newest line of each log under $R/logs; it returns
# when the stages have ended (exit status 0) or after SECONDS (exit status 3: they still run), and packs $R
# into $PACK either way (reproduce/pack_dir.sh: checkpoints and weights left out, as gpu_session.sh packs).
set -uo pipefail
cd "$(dirname "$0")/.."
R=${R:-/tmp/work}
mkdir -p "$R/logs"

case "${1:-}" in
  start)
    shift
    [ $# -gt 0 ] || { echo "detached.sh start: name at least one stage of reproduce/gpu_session.sh"; exit 2; }
    rm -f "$R/detached.rc"
    # PACK is for watch: the first command's $OUT is gone by the time the stages end
    PACK='' setsid nohup bash -c 'bash reproduce/gpu_session.sh "$@"; echo $? > "$R/detached.rc"' detached "$@" \
      > "$R/logs/detached.out" 2>&1 < /dev/null &
    echo "started in the background: $* (output: $R/logs/detached.out)"
    ;;
  watch)
    limit=${2:?detached.sh watch SECONDS}
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
    exit $status
    ;;
  *)
    echo "usage: detached.sh start STAGE... | detached.sh watch SECONDS"
    exit 2
    ;;
esac
