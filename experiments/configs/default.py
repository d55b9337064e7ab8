"""The main job: a 4-block recommender on synthetic data over a data=4 x tensor=2 mesh.

  python -m experiments.train --config=experiments/configs/default.py --workdir=/tmp/rec_llm/default

Runs on 8 virtual CPU devices (the trainer creates them unless XLA_FLAGS says otherwise)
or on 8 accelerators. Measured on the 2-core CPU machine: 300 steps in about 3 minutes;
the loss falls from 8.3 (ln of the 4,096 items) to about 2.5 and train HR@10 rises from
0.002 to about 0.86; held-out ranking (eval/..., test/...) is logged at the end (test HR@10
about 0.83).
"""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.mesh = ml_collections.ConfigDict(dict(data=4, tensor=2, pipe=1))
  c.model = ml_collections.ConfigDict(dict(
      num_layers=4, d_model=128, num_heads=4, mlp_dim=512, max_len=64, vocab_multiple=128,
      dropout_rate=0.0, dtype="float32", remat=False,
      dropout_bits="threefry",  # dropout masks' random bits: 'threefry' | 'hash' (cheaper)
      scan_unroll=1,  # blocks per iteration of the scan over layers (num_layers: unrolled)
      causal_blocks=0,  # causal attention's query blocks (0: about 50 queries each)
      block="transformer",  # or 'hstu': SiLU attention, relative position bias, gate, no MLP
      temperature=0.0))  # > 0: cosine-similarity scores / temperature
  # Used when mesh.pipe > 1: schedule 'gpipe' | '1f1b'; microbatches per data replica;
  # stage_layers: blocks per stage, e.g. (1, 3, 3, 1) (empty: as even as possible);
  # remat: recompute each block's activations in the backward; stage_local: with even stages
  # (and no adaptive balancing) each stage stores only its own blocks and their optimizer
  # state (False: every stage holds every block, as uneven or adaptive stages do).
  c.pipeline = ml_collections.ConfigDict(dict(schedule="1f1b", microbatches=4, stage_layers=(),
                                              remat=False, stage_local=True))
  # Data parallelism beyond GSPMD's all-reduce (rec_llm/train/dp_step.py). mode: 'sync' |
  # 'stale' (staleness tau) | 'local_sgd' (local_steps H, DiLoCo outer Nesterov step);
  # aggregator: 'psum' | 'ring' | 'hierarchical' (group = devices per node) | 'sparse';
  # compression.kind: 'none' | 'topk' | 'randomk' | 'qsgd' | 'int8' | 'sign' | 'powersgd';
  # compression.precondition: 'none' (AdamW after the mean) | 'adam' (each replica's AdamW
  # direction is what gets compressed; the optimizer then applies weight decay and the lr).
  # zero: state sharded over data: 0 none, 1 optimizer state (ZeRO-1), 3 parameters too (FSDP).
  c.dp = ml_collections.ConfigDict(dict(
      zero=0, mode="sync", staleness=0, local_steps=1, outer_lr=0.7, outer_momentum=0.9,
      aggregator="psum", group=0,
      compression=ml_collections.ConfigDict(dict(kind="none", ratio=0.01, bits=8, rank=4,
                                                 momentum=0.0, precondition="none"))))
  # Adaptive load balancing of pipeline stages (mesh.pipe > 1): every `every_steps` steps,
  # measure block / embedding / head costs and re-partition the blocks when the predicted
  # saving over the remaining steps beats fixed_cost_s (-1: the measured compile time).
  c.balance = ml_collections.ConfigDict(dict(adaptive=False, every_steps=100, min_gain=0.05,
                                             repeats=5, fixed_cost_s=-1.0))
  # name: 'synthetic' (num_items, zipf_a, p_follow, eval_users apply) or a MovieLens format
  # ('ml-100k', 'ml-1m', 'ml-20m', 'ml-25m', 'sasrec': path, data_dir, length_buckets apply).
  # length_buckets: input widths a batch may be cut to, e.g. (25, 50, 100) ((): always max_len).
  c.data = ml_collections.ConfigDict(dict(
      name="synthetic", num_items=4096, zipf_a=1.1, p_follow=0.8, eval_users=512,
      path="", data_dir="", length_buckets=()))
  c.train = ml_collections.ConfigDict(dict(
      steps=300, batch_size=64, learning_rate=3e-3, warmup_steps=30, end_lr_fraction=0.1,
      optimizer="adamw", momentum=0.0,  # 'adamw' | 'sgd' (heavy-ball momentum)
      weight_decay=0.01, grad_clip=1.0, b1=0.9, b2=0.98, seed=0, log_every=25,
      peak_tflops=0.0,   # 0: look the device up, else measure a matmul
      nonfinite="skip",  # a non-finite loss/gradient: 'skip' the update, or 'stop' the run
      # loss: 'softmax' (over every item) | 'sampled' (`negatives` drawn per step by
      # `sampler` 'uniform' | 'popularity' | 'in_batch', in `neg_strata` blocks of the
      # table, shared by the whole batch or drawn per row (neg_share 'batch' | 'row');
      # rec_llm/parallel/sampled_softmax.py).
      loss="softmax", sampler="uniform", negatives=128, neg_strata=8, neg_share="batch",
      profile_steps=(),  # (first, last): a jax.profiler trace of steps [first, last) in WORKDIR/profile
      # Fault injection, for tests: steps whose gradients / update / new optimizer state
      # are made NaN (rec_llm/train/faults.py).
      inject_nonfinite=ml_collections.ConfigDict(dict(gradients=(), updates=(), opt_state=()))))
  # Held-out next-item ranking over all items; filter_seen: leave the items of the input
  # window out of it (the generative-recommenders default); num_negatives > 0: the SASRec
  # paper's sampled protocol.
  c.eval = ml_collections.ConfigDict(dict(every_steps=100, batch_size=256, ks=(10, 50, 200),
                                          num_negatives=0, filter_seen=False))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=100, max_to_keep=3))
  return c
