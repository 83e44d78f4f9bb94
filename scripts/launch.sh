#!/usr/bin/env bash
# One node of a multi-node gkd trainer: torchrun with a c10d rendezvous, `python -m gkd.trainer` per process.
# For trainer-only nodes with services you start yourself; `gkd train --nnodes N --node-rank R
# --rdzv-endpoint HOST:PORT` (or scripts/slurm/gkd.sbatch) starts a node's trainer and services together.
# Run it on every trainer node with the same config and rendezvous endpoint; only the node rank differs.
# The teacher and rollout services are started separately (their own nodes, `gkd teacher serve` /
# `gkd rollout serve --weight-channel NODE0:rollout.weight_port`); the config points at them
# (teacher.server_ip, rollout.server_ip, launch=false). See docs/guide.md, "Multi-node".
#
#   scripts/launch.sh --nnodes 2 --node-rank 0 --rdzv-endpoint 10.0.0.1:29400 --config configs/X.yaml [key=value ...]
#   NNODES=2 NODE_RANK=1 RDZV_ENDPOINT=10.0.0.1:29400 scripts/launch.sh --config configs/X.yaml [key=value ...]
#
# Flags win over the environment variables:
#   --nnodes N          NNODES          trainer nodes (default: trainer.nnodes from the config)
#   --node-rank R       NODE_RANK       this node, 0..N-1 (required; node 0 hosts global rank 0, the driver)
#   --rdzv-endpoint H:P RDZV_ENDPOINT   rendezvous host:port, reachable from every node (required)
#   --nproc-per-node P  NPROC_PER_NODE  processes here (default: the config's, one per GPU or nproc_per_node)
#   --rdzv-id ID        RDZV_ID         run id shared by the nodes (default: gkd)
#   --dry-run                           print the command, do not run it
# PYTHON selects the interpreter (default: .venv/bin/python when present, else python3).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
nnodes=${NNODES:-}
node_rank=${NODE_RANK:-}
endpoint=${RDZV_ENDPOINT:-}
nproc=${NPROC_PER_NODE:-}
rdzv_id=${RDZV_ID:-gkd}
dry_run=0
args=()

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }
need() { [ "$#" -ge 2 ] || { echo "launch.sh: $1 needs a value" >&2; exit 2; }; }

while [ "$#" -gt 0 ]; do
  case "$1" in
    --nnodes) need "$@"; nnodes=$2; shift 2 ;;
    --node-rank) need "$@"; node_rank=$2; shift 2 ;;
    --rdzv-endpoint) need "$@"; endpoint=$2; shift 2 ;;
    --nproc-per-node) need "$@"; nproc=$2; shift 2 ;;
    --rdzv-id) need "$@"; rdzv_id=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage ;;
    *) args+=("$1"); shift ;;  # --config FILE and key=value overrides go to gkd.trainer
  esac
done

[ -n "$node_rank" ] || { echo "launch.sh: set --node-rank or NODE_RANK (0 on the first node)" >&2; exit 2; }
[ -n "$endpoint" ] || { echo "launch.sh: set --rdzv-endpoint or RDZV_ENDPOINT (HOST:PORT of node 0)" >&2; exit 2; }

# the config decides what was not given (and a bad key fails here, on every node, before torchrun)
read -r cfg_nnodes cfg_nproc < <(
  "$PYTHON" - "${args[@]}" <<'EOF'
import sys

from gkd.config import ConfigError, load_config

argv = sys.argv[1:]
paths = [argv[i + 1] for i, a in enumerate(argv) if a == "--config" and i + 1 < len(argv)]
overrides = [a for i, a in enumerate(argv) if a != "--config" and (i == 0 or argv[i - 1] != "--config")]
try:
    cfg = load_config(paths, overrides)
except ConfigError as e:
    sys.exit(f"launch.sh: {e}")
print(cfg.trainer.nnodes, cfg.trainer.procs_per_node)
EOF
) || exit 2
nnodes=${nnodes:-$cfg_nnodes}
nproc=${nproc:-$cfg_nproc}
if [ "$node_rank" -ge "$nnodes" ] 2>/dev/null || ! [ "$node_rank" -ge 0 ] 2>/dev/null; then
  echo "launch.sh: node rank $node_rank is not in 0..$((nnodes - 1))" >&2
  exit 2
fi

cmd=("$PYTHON" -m torch.distributed.run --nnodes "$nnodes" --node-rank "$node_rank" --nproc-per-node "$nproc"
     --rdzv-backend c10d --rdzv-endpoint "$endpoint" --rdzv-id "$rdzv_id"
     -m gkd.trainer "${args[@]}" "trainer.nnodes=$nnodes")
printf '%q ' "${cmd[@]}"
echo
[ "$dry_run" -eq 1 ] && exit 0
exec "${cmd[@]}"
