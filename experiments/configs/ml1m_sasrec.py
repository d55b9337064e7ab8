"""SASRec-sized model on MovieLens-1M (SASRec preprocessing), full-softmax loss, full ranking.

  python -m experiments.train --config=experiments/configs/ml1m_sasrec.py \
      --config.data.path=../shared/data/sasrec/ml-1m.txt --workdir=/tmp/rec_llm/ml1m

Protocol: leave-one-out (last item = test, second-to-last = validation), the target ranked
against all 3,416 items, seen items kept. Reference (generative-recommenders, SASRec with
sampled softmax, length 200, dim 50, 2 blocks, 1 head): HR@10 0.2853, NDCG@10 0.1603.
Measured on the 2-core CPU machine (8 virtual devices, data=4 x tensor=2), run stopped by
SIGTERM at step 2,205 of 4,000 (47 epochs, 38 min wall), then evaluated on the test split:
HR@10 0.2263, NDCG@10 0.1186, HR@50 0.4944, NDCG@50 0.1773, HR@200 0.7182, MRR 0.1012
(validation HR@10 0.2369). Validation HR@10 rose 0.179 / 0.215 / 0.232 / 0.233 at steps
500 / 1000 / 1500 / 2000: this size is still below the reference. An earlier 2,000-step
run without length buckets reached validation HR@10 0.2344 at step 1,250.
"""

from experiments.configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.mesh.update(data=4, tensor=2, pipe=1)
  c.model.update(num_layers=2, d_model=64, num_heads=2, mlp_dim=256, max_len=200,
                 dropout_rate=0.2, vocab_multiple=128)
  # Length buckets: a batch of similar-length users is only as wide as it needs to be
  # (exact: positions count back from the latest item), 1.5x fewer positions on ML-1M.
  c.data = default.ml_collections.ConfigDict(dict(name="sasrec", path="", data_dir="",
                                                  length_buckets=(25, 50, 100)))
  c.train.update(steps=4000, batch_size=128, learning_rate=2e-3, warmup_steps=100,
                 end_lr_fraction=0.05, weight_decay=0.01, b2=0.98, log_every=100)  # 85 epochs
  c.eval.update(every_steps=500, batch_size=512, ks=(10, 50, 200), num_negatives=0)
  c.checkpoint.update(every_steps=500, max_to_keep=2)
  return c
