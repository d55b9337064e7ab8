r"""The paper's comparisons, simulated (rec_llm.sim): single strategies vs the planned hybrid,
compression, scaling 8 -> 512 devices, synchronous vs asynchronous data parallelism.

  python -m experiments.sweep --config=experiments/configs/sweeps/paper_strategies.py --workdir=/tmp/paper
  python -m experiments.paper_tables --results=/tmp/paper --out=experiments/results/paper_tables.md

Expected: 100 simulated points (79 ok, 21 infeasible with the reason) in about 40 seconds on
the 2-core CPU machine, no accelerator needed; the tables as in
experiments/results/paper_tables.md (hybrid / best single strategy on 16 H100 nodes: 1.26x
throughput without compression, 1.17x with the best compression of each; 5.30x and 5.66x
for the 7B and 61B models, where pure DP needs ZeRO-3 across nodes).

Model: experiments/configs/large_1b.py (24 blocks of width 2,048: 1.2B parameters in the
blocks), bf16 activations, sequences of 200. Its shipped 2M-item table (4.1B parameters)
does not fit on one 80 GB GPU with its gradient and Adam moments, so pure DP runs it only
with ZeRO-3 (the planner searches dp.zero for every data-parallel plan): the 'strategies_2m'
group shows that. The main comparison uses a 200K-item table (0.4B parameters), so that pure
DP without sharded state is a real baseline too.
Batches scale with the cluster (rows_per_device x devices): 8 sequences of 200 per GPU.

Groups (experiments/paper_tables.py builds its tables from them by name):
  strategies      pure DP / TP / PP and the planner's best hybrid, per compression, on one
                  H100 node (h100x8) and on 16 nodes (h100x128)
  strategies_2m   the same with the shipped 2M-item table on h100x128
  strategies_7b   a 7B model (32 x 4096) on h100x128; strategies_61b: 61B (80 x 8192) on
                  1,024 H100s; strategies_200m: a 200M-item table on 1,024 H100s;
                  strategies_2b: a 2B-item table with a sampled softmax (1,024
                  negatives per sequence) on 1,024 H100s;
                  strategies_mixed: 2 A100 + 2 H100 nodes (per-device roofline)
  rows_per_device the hybrid / pure DP comparison at 2, 8 and 32 sequences per GPU
  scaling         8 -> 512 H100s (h100x128's nodes and links), weak scaling
  dp_modes        sync vs stale (2 steps) vs local SGD (8 steps), pure DP and hybrid
"""

import ml_collections

PAPER_MODEL = dict(data=dict(num_items=200_000))
COMPRESSIONS = ("none", "int8", "topk", "powersgd")


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.name = "paper_strategies"
  c.defaults = dict(config="experiments/configs/large_1b.py", overrides=PAPER_MODEL,
                    sources=("simulated",), rows_per_device=8, dp_modes=("sync",),
                    staleness=2, local_steps=8, trace=False)
  c.groups = [
      dict(name="strategies", clusters=("h100x8", "h100x128"), meshes=("dp", "tp", "pp", "hybrid"),
           compressions=COMPRESSIONS, trace=True),  # traces: notebooks/explore_results.ipynb
      dict(name="strategies_2m", overrides={}, clusters=("h100x128",),
           meshes=("dp", "tp", "pp", "hybrid"), compressions=COMPRESSIONS),
      # Larger recommenders, the 200K-item table: about 7B (32 x 4096) on 128 GPUs and 61B
      # (80 x 8192, MLP 28672) on 1,024.
      dict(name="strategies_7b", clusters=("h100x128",), compressions=("none", "powersgd"),
           meshes=("dp", "tp", "pp", "hybrid"), overrides=dict(PAPER_MODEL, model=dict(
               num_layers=32, d_model=4096, num_heads=32, mlp_dim=16384))),
      dict(name="strategies_61b", clusters=("h100x128",), devices=(1024,),
           compressions=("none", "powersgd"), meshes=("dp", "tp", "pp", "hybrid"),
           overrides=dict(PAPER_MODEL, model=dict(num_layers=80, d_model=8192, num_heads=64,
                                                  mlp_dim=28672))),
      # A 200M-item table (410B parameters in the table) on 1,024 H100s, and a heterogeneous
      # cluster (2 A100 nodes + 2 H100 nodes).
      dict(name="strategies_200m", clusters=("h100x128",), devices=(1024,),
           compressions=("none",), meshes=("dp", "tp", "pp", "hybrid"),
           overrides=dict(data=dict(num_items=200_000_000))),
      # A 2B-item table (4.1T parameters in the table) on 1,024 H100s with a sampled softmax
      # (1,024 negatives per sequence, drawn per row): a full softmax over 2B items cannot
      # run at all, but the table's own state must still fit (sharded over tensor x ZeRO).
      dict(name="strategies_2b", clusters=("h100x128",), devices=(1024,),
           compressions=("none",), meshes=("dp", "tp", "pp", "hybrid"),
           overrides=dict(data=dict(num_items=2_000_000_000), train=dict(
               loss="sampled", negatives=1024, neg_share="row"))),
      dict(name="strategies_mixed", clusters=("mixed_a100_h100",), compressions=("none",),
           meshes=("dp", "tp", "pp", "hybrid")),
      dict(name="rows_per_device", clusters=("h100x128",), rows_per_device=(2, 8, 32),
           meshes=("dp", "hybrid"), compressions=("none", "any")),
      dict(name="scaling", clusters=("h100x128",), devices=(8, 16, 32, 64, 128, 256, 512),
           meshes=("dp", "hybrid"), compressions=("none", "any")),
      dict(name="dp_modes", clusters=("h100x128",), meshes=("dp", "hybrid"),
           compressions=("none",), dp_modes=("sync", "stale", "local_sgd")),
  ]
  return c
