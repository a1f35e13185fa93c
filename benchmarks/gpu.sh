#!/usr/bin/env bash
# GPU throughput of auditbench's model path (inference, Grad-CAM, fine-tune step per paper backbone) and the
# paper grid's projected wall time; a thin wrapper around benchmarks/gpu_bench.py (all options pass through).
#
#   benchmarks/gpu.sh [--out FILE.json] [--batch-size 32] [--iterations 10] [--repeats 3] ...
#   benchmarks/gpu.sh --smoke            # CPU, tiny backbone: checks the script, measures nothing useful
#
# Exits 3 with one line on stderr when torch sees no CUDA device, unless --device cpu or --smoke is given.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
# The checkout's auditbench even where it is not pip-installed (a fresh GPU machine with torch and timm).
export PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}"

need_cuda=1
previous=""
for arg in "$@"; do
  case "$arg" in
    --smoke | --device=cpu) need_cuda=0 ;;
    cpu) [[ "$previous" == "--device" ]] && need_cuda=0 ;;
  esac
  previous="$arg"
done

if [[ "$need_cuda" == 1 ]]; then
  "$python" - <<'PY'
import sys
try:
    import torch
except Exception as error:  # a broken install says so, not "no GPU"
    sys.exit(f"gpu.sh: cannot import torch ({type(error).__name__}: {error})")
if not torch.cuda.is_available():
    print("gpu.sh: no CUDA device visible to torch (torch.cuda.is_available() is False);"
          " run on a GPU machine, or pass --device cpu or --smoke", file=sys.stderr)
    sys.exit(3)
PY
fi
exec "$python" "$here/gpu_bench.py" "$@"
