r"""Data-parallel methods at a full fast-path run on MovieLens-1M: quality against dense,
bytes per step and synchronisations per epoch, over seeds.

  python -m benchmarks.dp_methods --data=../shared/data/sasrec/ml-1m.txt \
      [--points=dense,stale2,...] [--seeds=0,1,2] [--out=benchmarks/results/dp_methods.json]

Every point trains experiments/configs/ml1m_fast.py (1,300 steps of 128 sequences, 27.7
epochs, AdamW inner optimizer) on data=4 (4 virtual devices) with the point's `dp` settings,
then ranks the test items against every item, seen items filtered (the reference protocol).
Per point: the data-parallel bytes each device sends per step, read from the compiled HLO
(benchmarks.common.dp_bytes: local SGD's sync divided by H) beside the compressor's
analytic payload; the ratio dense bytes / these bytes; synchronisations per epoch; and per
seed test NDCG@10 / HR@10 / HR@50 / HR@200, wall time. The summary gives each point's mean
over seeds and its ratio to dense's mean. Results merge into --out by (point, seed), so a
sweep can be run a few points at a time. About 5 minutes per run on the 2-core CPU machine.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  # as many devices as the mesh (data=4) has
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import json
import statistics
import time

from absl import app, flags

from benchmarks import common
from experiments.configs import ml1m_fast
from rec_llm.train import trainer


def _local(h: int, average: bool = True, lr_scale: float = 1.0, **compression) -> dict:
  """Local SGD every h steps: `average` replaces DiLoCo's outer Nesterov step (the config's
  outer_lr 0.7, momentum 0.9) with the plain average (outer lr 1, no momentum)."""
  d = dict(mode="local_sgd", local_steps=h, lr_scale=lr_scale, **compression)
  if average:
    d.update(outer_lr=1.0, outer_momentum=0.0)
  return d


# name: (what it is, overrides: top-level dp keys and dp.compression keys by name; `lr_scale`
# multiplies ml1m_fast's learning rate (3e-3))
POINTS = {
    "dense": ("synchronous, the explicit ring all-reduce", dict(aggregator="ring")),
    "stale2": ("asynchronous: gradients applied 2 steps late", dict(mode="stale", staleness=2)),
    "stale4": ("asynchronous: gradients applied 4 steps late", dict(mode="stale", staleness=4)),
    "stale2_lr": ("stale 2, the learning rate divided by 1 + tau (staleness-aware)",
                  dict(mode="stale", staleness=2, lr_scale=1 / 3)),
    "local8": ("DiLoCo: inner AdamW, outer Nesterov every 8 steps", _local(8, average=False)),
    "local32": ("DiLoCo: inner AdamW, outer Nesterov every 32 steps", _local(32, average=False)),
    "local8_lr2": ("DiLoCo every 8 steps, the inner learning rate doubled",
                   _local(8, average=False, lr_scale=2)),
    "local32_lr2": ("DiLoCo every 32 steps, the inner learning rate doubled",
                    _local(32, average=False, lr_scale=2)),
    "local8_avg": ("local SGD: inner AdamW, the replicas averaged every 8 steps (outer lr 1, "
                   "no momentum)", _local(8)),
    "local8_avg_lr2": ("local SGD averaged every 8 steps, the inner learning rate doubled (6e-3)",
                       _local(8, lr_scale=2)),
    "local32_avg": ("local SGD: inner AdamW, the replicas averaged every 32 steps", _local(32)),
    "local32_avg_lr2": ("local SGD averaged every 32 steps, the inner learning rate doubled",
                        _local(32, lr_scale=2)),
    "local32_avg_lr2_int8": ("local SGD averaged every 32 steps, the inner learning rate "
                             "doubled, the average sent as int8 + error feedback",
                             _local(32, lr_scale=2, kind="int8", aggregator="ring")),
    "topk1": ("top-k 1% + error feedback, AdamW on the mean",
              dict(kind="topk", ratio=0.01, aggregator="sparse")),
    "topk0.1": ("top-k 0.1% + error feedback, AdamW on the mean",
                dict(kind="topk", ratio=0.001, aggregator="sparse")),
    "sign": ("1-bit (sign x chunk mean) + error feedback, AdamW on the mean",
             dict(kind="sign", aggregator="ring")),
    "powersgd4": ("PowerSGD rank 4 + error feedback, AdamW on the mean",
                  dict(kind="powersgd", rank=4, aggregator="psum")),
    "topk1_adam": ("top-k 1% of each replica's AdamW direction + error feedback",
                   dict(kind="topk", ratio=0.01, aggregator="sparse", precondition="adam")),
    "topk1_adam_lr2": ("top-k 1% of each replica's AdamW direction, the learning rate doubled",
                       dict(kind="topk", ratio=0.01, aggregator="sparse", precondition="adam",
                            lr_scale=2)),
    "topk0.1_adam": ("top-k 0.1% of each replica's AdamW direction + error feedback",
                     dict(kind="topk", ratio=0.001, aggregator="sparse", precondition="adam")),
    "sign_adam": ("1-bit of each replica's AdamW direction + error feedback",
                  dict(kind="sign", aggregator="ring", precondition="adam")),
    "topk0.1_adam_lr2": ("top-k 0.1% of each replica's AdamW direction, the learning rate "
                         "doubled", dict(kind="topk", ratio=0.001, aggregator="sparse",
                                         precondition="adam", lr_scale=2)),
    "sign_adam_lr2": ("1-bit of each replica's AdamW direction, the learning rate doubled",
                      dict(kind="sign", aggregator="ring", precondition="adam", lr_scale=2)),
    "local8_sign": ("DiLoCo every 8 steps, the outer gradient sent as 1 bit + error feedback",
                    _local(8, average=False, kind="sign", aggregator="ring")),
    "local8_avg_sign": ("local SGD averaged every 8 steps, the average sent as 1 bit + error "
                        "feedback", _local(8, kind="sign", aggregator="ring")),
    "local4_avg_sign": ("local SGD averaged every 4 steps, the average sent as 1 bit + error "
                        "feedback", _local(4, kind="sign", aggregator="ring")),
}
_COMPRESSION_KEYS = ("kind", "ratio", "bits", "rank", "momentum", "precondition")

_DATA = flags.DEFINE_string("data", "../shared/data/sasrec/ml-1m.txt", "SASRec-format ML-1M file.")
_POINTS = flags.DEFINE_list("points", list(POINTS), "Which points, in order (none: only "
                            "re-summarise --out).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "train.seed values.")
_STEPS = flags.DEFINE_integer("steps", 0, "Training steps (0: the config's 1,300).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/dp_methods.json", "Output JSON path.")


def point_config(name: str, seed: int):
  c = ml1m_fast.get_config()
  c.data.path = _DATA.value
  c.mesh.data = 4
  c.train.seed = seed
  if _STEPS.value:
    c.train.update(steps=_STEPS.value, warmup_steps=min(c.train.warmup_steps, _STEPS.value))
  for k, v in POINTS[name][1].items():
    if k == "lr_scale":
      c.train.learning_rate *= v
    else:
      (c.dp.compression if k in _COMPRESSION_KEYS else c.dp)[k] = v
  return c


def run_one(name: str, seed: int) -> dict:
  config = point_config(name, seed)
  t = time.perf_counter()
  history = trainer.train(config, None)
  last = [r for r in history if "skipped" in r][-1]
  out = {"point": name, "seed": seed, "wall_s": time.perf_counter() - t,
         "steps": config.train.steps, "skipped": last["skipped"],
         "steps_per_epoch": round(last["step"] / last["epoch"])}
  times = [r["step_time_s"] for r in history if "step_time_s" in r][1:]
  out["step_time_s"] = statistics.median(times)
  for r in history:
    out.update({k: v for k, v in r.items() if k.startswith("test/")})
  print(f"{name} seed {seed}: NDCG@10 {out['test/ndcg@10']:.4f} HR@10 {out['test/hr@10']:.4f} "
        f"({out['wall_s']:.0f} s)", flush=True)
  return out


def summarise(runs: list[dict], bytes_: dict) -> list[dict]:
  rows = []
  mean = lambda p, k: statistics.mean(r[k] for r in runs if r["point"] == p)
  for p in POINTS:
    mine = [r for r in runs if r["point"] == p]
    if not mine or p not in bytes_:
      continue
    row = {"point": p, "what": POINTS[p][0], "seeds": sorted(r["seed"] for r in mine),
           **bytes_[p], **{f"mean_{k}": mean(p, k) for k in
                           ("test/ndcg@10", "test/hr@10", "test/hr@50", "test/hr@200")}}
    row["std_test/ndcg@10"] = statistics.pstdev(r["test/ndcg@10"] for r in mine)
    row["syncs_per_epoch"] = mine[0]["steps_per_epoch"] / bytes_[p]["sync_every"]
    if "dense" in bytes_ and any(r["point"] == "dense" for r in runs):
      row["compression_ratio"] = bytes_["dense"]["dp_bytes_hlo"] / max(row["dp_bytes_hlo"], 1e-9)
      row["ndcg10_vs_dense"] = row["mean_test/ndcg@10"] / mean("dense", "test/ndcg@10")
      row["hr10_vs_dense"] = row["mean_test/hr@10"] / mean("dense", "test/hr@10")
    rows.append(row)
  return rows


def _write(runs, bytes_):
  common.write(_OUT.value, {"benchmark": "dp_methods", "mesh": "data=4",
                            "protocol": "full ranking, seen items filtered, test split",
                            "summary": summarise(runs, bytes_), "bytes": bytes_, "runs": runs})


def main(argv):
  del argv
  old = {}
  if os.path.exists(_OUT.value):
    with open(_OUT.value) as f:
      old = json.load(f)
  runs, bytes_ = old.get("runs", []), old.get("bytes", {})
  for name in _POINTS.value:
    if name not in POINTS:
      raise SystemExit(f"unknown point {name!r}; choose from {list(POINTS)}")
    if name not in bytes_:
      bytes_[name] = common.dp_bytes(point_config(name, 0))
    for seed in (int(s) for s in _SEEDS.value):
      prov = common.provenance()
      r = {**run_one(name, seed), "command": prov["command"], "git_commit": prov["git_commit"]}
      runs = [x for x in runs if (x["point"], x["seed"]) != (name, seed)] + [r]
      _write(runs, bytes_)
  if not _POINTS.value:  # --points= only re-summarises what --out holds
    _write(runs, bytes_)
  print(f"{'point':20} {'bytes/step':>11} {'ratio':>7} {'syncs/ep':>8} {'NDCG@10':>8} "
        f"{'HR@10':>7} {'vs dense':>8}")
  for r in summarise(runs, bytes_):
    print(f"{r['point']:20} {r['dp_bytes_hlo']:11,.0f} {r.get('compression_ratio', 0):7.1f} "
          f"{r['syncs_per_epoch']:8.1f} {r['mean_test/ndcg@10']:8.4f} {r['mean_test/hr@10']:7.4f} "
          f"{r.get('ndcg10_vs_dense', 0):8.3f}")


if __name__ == "__main__":
  app.run(main)
