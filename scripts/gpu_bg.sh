#!/usr/bin/env bash
# A job longer than one command on the GPU machine (a table cell of 20 minutes, say), run in
# the background and waited for across several commands:
#   scripts/gpu_bg.sh start DIR CMD [ARG...]   start CMD detached (setsid); its output goes to
#                                             DIR/out.log, its pid to DIR/pid, and its exit
#                                             status to DIR/rc once it ends
#   scripts/gpu_bg.sh wait DIR [SECONDS]       wait until the job has ended or SECONDS have
#                                             passed (default 570); print "done rc=N" or
#                                             "running", then the log's tail; exit 0 when done,
#                                             3 while it runs
# The wait looks for DIR/rc, not for a process name: a `pgrep -f` on the script's name also
# finds the command that waits for it.
set -uo pipefail
usage() {
  echo "usage: $0 start DIR CMD [ARG...] | $0 wait DIR [SECONDS]" >&2
  exit 2
}
[ $# -ge 2 ] || usage
action=$1
dir=$2
shift 2
case "$action" in
  start)
    [ $# -ge 1 ] || usage
    mkdir -p "$dir"
    rm -f "$dir/rc"
    setsid nohup bash -c '"$@"; echo $? > "$0/rc"' "$dir" "$@" > "$dir/out.log" 2>&1 < /dev/null &
    echo $! > "$dir/pid"
    echo "started pid $(cat "$dir/pid"), log $dir/out.log"
    ;;
  wait)
    limit=${1:-570}
    start=$SECONDS
    while [ ! -f "$dir/rc" ] && [ $((SECONDS - start)) -lt "$limit" ]; do sleep 3; done
    if [ -f "$dir/rc" ]; then
      echo "done rc=$(cat "$dir/rc") after $((SECONDS - start)) s"
      status=0
    else
      echo "running after $((SECONDS - start)) s"
      status=3
    fi
    tail -5 "$dir/out.log" 2>/dev/null
    exit $status
    ;;
  *) usage ;;
esac
