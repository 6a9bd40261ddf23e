#!/usr/bin/env bash
# Compiles each CUDA source for sm_90a with ptxas reporting on (the flags of the ernie_cuda
# target) and fails where ptxas serialises wgmma ("Potential Performance Loss") or spills
# registers. Both cost speed silently: the build still succeeds, the tests still pass.
# Usage: ptxas_check.sh NVCC SRC_DIR FILE.cu...
set -uo pipefail
nvcc=$1 src=$2
shift 2
fail=0
for f in "$@"; do
  if ! out=$("$nvcc" -std=c++20 -O3 -gencode=arch=compute_90a,code=sm_90a \
      --expt-relaxed-constexpr -I"$src" -Xptxas -v -c "$f" -o /dev/null 2>&1); then
    echo "$f does not compile:"
    tail -5 <<< "$out"
    fail=1
    continue
  fi
  if grep -q "Potential Performance Loss" <<< "$out"; then
    echo "$f: ptxas serialises wgmma:"
    grep "Potential Performance Loss" <<< "$out" |
      sed -E "s/^ptxas info *: //; s/ in (the )?function '([^']*)'.*/\n  in \2/"
    fail=1
  fi
  if grep -qE "[1-9][0-9]* bytes spill (stores|loads)" <<< "$out"; then
    echo "$f: a kernel spills registers:"
    grep -B2 -E "[1-9][0-9]* bytes spill (stores|loads)" <<< "$out" | head -6
    fail=1
  fi
done
[ $fail = 0 ] && echo "ptxas: no serialised wgmma, no spills in $# files"
exit $fail
