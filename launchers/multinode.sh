#!/usr/bin/env bash
# Multi-node kd training with the deepspeed launcher, in either of its two forms.
#
# 1) pdsh: run ONCE, on the first node. deepspeed reaches every node of the hostfile over passwordless ssh (pdsh)
#    and starts one process per slot there. Environment variables the remote ranks need (NCCL_*, KD_CACHE, HF_HOME,
#    a venv's PATH) go in ./.deepspeed_env or ~/.deepspeed_env, one VAR=value per line: deepspeed exports them.
#
#      launchers/multinode.sh pdsh recipes/my.yaml [key.path=value ...]
#
# 2) per-node (no ssh): run the same command on EVERY node, each with its own NODE_RANK (0 on the master node).
#    For clusters without ssh between nodes, or where a scheduler starts one task per node (see slurm.sbatch).
#
#      NODE_RANK=0 MASTER_ADDR=node1 launchers/multinode.sh per-node recipes/my.yaml [key.path=value ...]   # on node1
#      NODE_RANK=1 MASTER_ADDR=node1 launchers/multinode.sh per-node recipes/my.yaml [key.path=value ...]   # on node2
#
# Environment:
#   HOSTFILE      hostfile (default: launchers/hostfile; see launchers/hostfile.example). Both forms need it: it
#                 gives the number of nodes and the GPUs (slots) per node.
#   MASTER_ADDR   address of node rank 0, reachable from every node (per-node form: required; pdsh form: default
#                 is the first host of the hostfile).
#   MASTER_PORT   a free TCP port on the master (default 29500).
#   NODE_RANK     this node's rank, 0..nodes-1 (per-node form only).
#   TRAIN_SCRIPT  the per-rank entry point (default: launchers/train.py).
#
# The recipe's run.output_dir must be on storage every node sees: rank 0 writes checkpoints/metrics there, and all
# ranks read checkpoints back on resume. With `resume: auto` (the default) re-running the same command after a crash
# continues from the newest complete checkpoint.
set -euo pipefail

usage() { sed -n '2,16p' "$0" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
mode=$1 recipe=$2
shift 2

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
hostfile=${HOSTFILE:-$here/hostfile}
train_script=${TRAIN_SCRIPT:-$here/train.py}
master_port=${MASTER_PORT:-29500}
[[ -f $hostfile ]] || { echo "multinode.sh: hostfile $hostfile not found (copy launchers/hostfile.example, or set HOSTFILE)" >&2; exit 2; }
[[ -f $recipe ]] || { echo "multinode.sh: recipe $recipe not found" >&2; exit 2; }

case $mode in
  pdsh)
    # The first host of the hostfile is node rank 0 unless MASTER_ADDR says otherwise.
    master_addr=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$hostfile")}
    cmd=(deepspeed --hostfile "$hostfile" --master_addr "$master_addr" --master_port "$master_port")
    ;;
  per-node)
    [[ -n ${NODE_RANK:-} ]] || { echo "multinode.sh: per-node form: set NODE_RANK (0 on the master node, 1.. on the others)" >&2; exit 2; }
    [[ -n ${MASTER_ADDR:-} ]] || { echo "multinode.sh: per-node form: set MASTER_ADDR (address of the node with NODE_RANK=0)" >&2; exit 2; }
    cmd=(deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$NODE_RANK"
         --master_addr "$MASTER_ADDR" --master_port "$master_port")
    ;;
  *) usage ;;
esac

cmd+=("$train_script" --recipe "$recipe" "$@")
echo "multinode.sh: ${cmd[*]}" >&2
exec "${cmd[@]}"
