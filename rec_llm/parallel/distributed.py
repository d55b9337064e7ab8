"""Multi-process start-up through `jax.distributed` (JAX's own engine, nothing home-made).

- `launch/local.sh` sets REC_LLM_COORDINATOR / REC_LLM_NUM_PROCESSES / REC_LLM_PROCESS_ID.
- On SLURM, Cloud TPU VMs and Open MPI, REC_LLM_DISTRIBUTED=auto lets JAX detect the cluster.
"""

import os

import jax


def initialize_from_env() -> bool:
  """Joins the multi-process job described by the environment; False if single-process."""
  addr = os.environ.get("REC_LLM_COORDINATOR")
  if addr:
    jax.distributed.initialize(
        coordinator_address=addr,
        num_processes=int(os.environ["REC_LLM_NUM_PROCESSES"]),
        process_id=int(os.environ["REC_LLM_PROCESS_ID"]),
        initialization_timeout=int(os.environ.get("REC_LLM_INIT_TIMEOUT_S", "120")))
    return True
  if os.environ.get("REC_LLM_DISTRIBUTED") == "auto":
    jax.distributed.initialize()
    return True
  return False
