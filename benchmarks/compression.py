r"""Data-parallel compression on MovieLens-1M: bytes on the wire vs ranking quality.

  python -m benchmarks.compression --data=../shared/data/sasrec/ml-1m.txt \
      [--steps=400] [--batch_size=128] [--seed=0] [--points=dense,topk1,...] \
      [--out=benchmarks/results/compression.json]

Every point trains the same model from the same seed for the same number of steps on
8 virtual devices (data=4 x tensor=2), then ranks the test items against all items.
Per point: the data-parallel bytes each device sends per step, read from the compiled
HLO (collectives whose groups span the 'data' axis, ring wire convention, see
rec_llm/parallel/hlo_stats.py; 'gspmd' is the default step, whose all-reduces also carry
more than the gradient) next to the compressor's analytic payload
(rec_llm.parallel.compression.payload_bytes); the compression ratio (dense bytes / these
bytes); step time; test NDCG@10 / HR@10 and their ratio to dense; wall time.
Local SGD syncs inside a conditional taken every H-th step: its HLO bytes are divided by H.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json
import statistics
import time

from absl import app, flags, logging

from benchmarks import common
from experiments.configs import ml1m_sasrec
from rec_llm.train import trainer

POINTS = {  # name: dp overrides
    "gspmd": {},  # the default step: XLA's all-reduce, placed by GSPMD
    "dense": dict(aggregator="ring"),  # the explicit dp step, uncompressed (= psum's bytes)
    "topk1": dict(kind="topk", ratio=0.01, aggregator="sparse"),
    "topk0.1": dict(kind="topk", ratio=0.001, aggregator="sparse"),
    "int8": dict(kind="int8", aggregator="ring"),
    "sign": dict(kind="sign", aggregator="ring"),
    "powersgd4": dict(kind="powersgd", rank=4, aggregator="psum"),
    # Deep Gradient Compression's own recipe: momentum SGD, the momentum kept per replica
    # before top-k (momentum correction), against dense momentum SGD at the same lr.
    # No global-norm clipping on either: it would cut DGC's accumulated bursts.
    "dense_sgdm": dict(aggregator="ring", train=dict(optimizer="sgd", momentum=0.9, grad_clip=0.0)),
    "topk0.1_dgc": dict(kind="topk", ratio=0.001, aggregator="sparse", momentum=0.9,
                        train=dict(optimizer="sgd", momentum=0.0, grad_clip=0.0)),
    "stale2": dict(mode="stale", staleness=2),
    "local8": dict(mode="local_sgd", local_steps=8),
}

REFERENCE = {"topk0.1_dgc": "dense_sgdm"}  # the dense point each is compared with (else 'dense')

_DATA = flags.DEFINE_string("data", "../shared/data/sasrec/ml-1m.txt", "SASRec-format ML-1M file.")
_STEPS = flags.DEFINE_integer("steps", 400, "Training steps per point.")
_MAX_LEN = flags.DEFINE_integer("max_len", 50, "Window length (200 is the quality config's).")
_POINTS = flags.DEFINE_list("points", list(POINTS), "Which points, in order.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/compression.json", "Output JSON path.")
_SGD_LR = flags.DEFINE_float("sgd_lr", 1.0, "Peak learning rate of the momentum-SGD points.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Global batch (sequences per step).")
_SEED = flags.DEFINE_integer("seed", 0, "train.seed: parameters, batch order.")
_MERGE = flags.DEFINE_bool("merge", False, "Keep the other points already in --out (rerun some).")


def point_config(name: str, data: str, steps: int, max_len: int):
  c = ml1m_sasrec.get_config()
  c.data.path = data
  c.data.length_buckets = tuple(b for b in (25, 50, 100) if b < max_len)
  c.model.update(max_len=max_len, temperature=0.0)  # dot-product scores, as measured
  c.train.update(steps=steps, batch_size=_BATCH.value, warmup_steps=min(100, steps // 4),
                 log_every=25, seed=_SEED.value)
  c.eval.update(every_steps=0, filter_seen=False)  # seen items kept, as the table was measured
  c.checkpoint.update(every_steps=0)
  for k, v in POINTS[name].items():
    if k == "train":
      c.train.update(v, learning_rate=_SGD_LR.value, weight_decay=0.0)
    else:
      (c.dp.compression if k in ("kind", "ratio", "bits", "rank", "momentum") else c.dp)[k] = v
  return c


def run_point(name: str) -> dict:
  config = point_config(name, _DATA.value, _STEPS.value, _MAX_LEN.value)
  out = {"point": name, "dp": config.dp.to_dict(), "steps": _STEPS.value,
         "batch_size": _BATCH.value, "learning_rate": config.train.learning_rate,
         "seed": _SEED.value,
         "max_len": _MAX_LEN.value, **common.dp_bytes(config)}
  t = time.perf_counter()
  history = trainer.train(config, None)
  out["wall_s"] = time.perf_counter() - t
  times = [r["step_time_s"] for r in history if "step_time_s" in r][1:]
  out["step_time_s"] = statistics.median(times)
  out["final_loss"] = [r["loss"] for r in history if "loss" in r][-1]
  for r in history:
    out.update({k: v for k, v in r.items() if k.startswith(("test/", "eval/"))})
  logging.warning("%s: %s", name, {k: out[k] for k in ("dp_bytes_hlo", "step_time_s", "test/ndcg@10")})
  return out


def main(argv):
  del argv
  results = []
  if _MERGE.value and os.path.exists(_OUT.value):
    with open(_OUT.value) as f:
      old = json.load(f)
    src = {k: old["provenance"][k] for k in ("command", "git_commit")}
    results = [{**src, **r} for r in old["results"] if r["point"] not in _POINTS.value]
  for name in _POINTS.value:
    prov = common.provenance()
    results.append({**run_point(name), "command": prov["command"], "git_commit": prov["git_commit"]})
    results.sort(key=lambda r: list(POINTS).index(r["point"]))
    by_name = {r["point"]: r for r in results}
    for r in results:
      dense = by_name.get(REFERENCE.get(r["point"], "dense"))
      if dense:  # quality against the dense run with the same optimizer
        r["reference"] = dense["point"]
        r["compression_ratio"] = dense["dp_bytes_hlo"] / max(r["dp_bytes_hlo"], 1e-9)
        r["ndcg10_vs_dense"] = r["test/ndcg@10"] / dense["test/ndcg@10"]
        r["hr10_vs_dense"] = r["test/hr@10"] / dense["test/hr@10"]
    common.write(_OUT.value, {"mesh": "data=4 x tensor=2", "results": results})
  print(f"{'point':10} {'DP bytes/step':>14} {'analytic':>12} {'ratio':>8} {'step s':>7} "
        f"{'NDCG@10':>8} {'HR@10':>7} {'vs dense':>8}")
  for r in results:
    print(f"{r['point']:10} {r['dp_bytes_hlo']:14,.0f} {r['dp_bytes_analytic']:12,.0f} "
          f"{r.get('compression_ratio', 0):8.1f} {r['step_time_s']:7.3f} {r['test/ndcg@10']:8.4f} "
          f"{r['test/hr@10']:7.4f} {r.get('ndcg10_vs_dense', 0):8.3f}")


if __name__ == "__main__":
  app.run(main)
