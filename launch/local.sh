#!/usr/bin/env bash
# Run NPROC training ranks on this machine with torchrun (one rank per GPU, or per CPU core on CPU).
#   launch/local.sh NPROC [--config-name=NAME] [KEY=VALUE ...]
# e.g. launch/local.sh 2 model=tiny train.micro_batch=2 train.global_batch=4 run.dir=runs/dp2
# PYTHON overrides the interpreter (default: .venv/bin/python, else python3).
set -euo pipefail

print_usage() {
    echo "usage: $0 NPROC [--config-name=NAME] [KEY=VALUE ...]"
    echo "  NPROC: number of ranks on this machine (a positive integer), e.g. $0 2 model=tiny"
}
usage() { print_usage >&2; exit 2; }

[[ $# -ge 1 ]] || usage
if [[ $1 == -h || $1 == --help ]]; then print_usage; exit 0; fi
nproc_arg=$1
shift
[[ $nproc_arg =~ ^[1-9][0-9]*$ ]] || { echo "error: NPROC must be a positive integer, got '$nproc_arg'" >&2; usage; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n ${PYTHON:-} ]]; then
    py=$PYTHON
elif [[ -x $repo/.venv/bin/python ]]; then
    py=$repo/.venv/bin/python
elif [[ -x .venv/bin/python ]]; then
    py=.venv/bin/python
else
    py=python3
fi

# CPU when there is no NVIDIA driver or the GPUs are hidden: DeepSpeed must not probe for CUDA, and
# several ranks sharing few cores must not each spawn a thread per core (10x slower, measured).
if ! command -v nvidia-smi >/dev/null 2>&1 || [[ ${CUDA_VISIBLE_DEVICES+set} == set && -z ${CUDA_VISIBLE_DEVICES} ]]; then
    export DS_ACCELERATOR=cpu
    export OMP_NUM_THREADS=1
fi

exec "$py" -m torch.distributed.run --standalone --nproc_per_node "$nproc_arg" -m glm_train.cli.train "$@"
