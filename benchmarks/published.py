r"""Ground truth for the simulator: published large-scale training runs, reproduced.

  python -m benchmarks.published [--out=benchmarks/results/published.json]

Each run below is a source's own model, batch, layout and hardware, as the source gives
them. The simulator (rec_llm.sim.simulator) predicts its step on the hardware's datasheet
preset (rec_llm.sim.cluster.DEVICE_PRESETS), with no fitting to these runs; the predicted
throughput is then counted the way the source counts it (`COUNTINGS`) and compared with the
published figure. Each run also gets the layout the planner itself picks for that model,
batch and cluster (rec_llm.sim.planner, searching what rec_llm's engine runs), beside the
source's.

Mapping a run onto the simulator's transformer (rec_llm/models: pre-LN blocks, tied item /
token table, full attention): the model's blocks, width, heads, vocabulary and sequence
length are the source's; a block with grouped-query attention or a gated (SwiGLU) MLP is
simulated as the dense block with the same matmul FLOPs and parameters (`mlp_dim` solved
for: `_dense_mlp`); microbatches at pipe = 1 run one after another with their gradients
accumulated (Plan.accumulate), as Megatron-LM does. Pure CPU arithmetic: runs anywhere in
seconds.
"""

import dataclasses
import time

from absl import app, flags

from benchmarks import common
from rec_llm.sim import cluster as cluster_lib
from rec_llm.sim import cost_model as cm
from rec_llm.sim import planner
from rec_llm.sim import simulator as sim

_OUT = flags.DEFINE_string("out", "benchmarks/results/published.json", "Output JSON path.")
_TOLERANCE = 0.15  # the bar: each run within 15% of its published throughput

SOURCES = {
    "megatron21": "Narayanan et al., Efficient Large-Scale Language Model Training on GPU Clusters "
                  "Using Megatron-LM, SC'21, arXiv:2104.04473, Table 1; layouts, micro-batches and "
                  "virtual stages from NVIDIA/Megatron-LM examples/sc21/run_table_1.sh",
    "korthikanti22": "Korthikanti et al., Reducing Activation Recomputation in Large Transformer "
                     "Models, MLSys'23, arXiv:2205.05198, Table 4 (full-recomputation baseline "
                     "iteration times)",
    "bloom": "BigScience BLOOM-176B training (bigscience-workshop/bigscience, "
             "train/tr11-176B-ml README: logged iteration at global batch 2048)",
    "llama3": "Llama Team, The Llama 3 Herd of Models, arXiv:2407.21783, Table 4 (405B, 8K context)",
    "maxtext": "google/maxtext, MaxText/configs/v5p/README.md results and their config scripts "
               "(commit 76bd53b0)",
}

# (id, source, device preset, devices, (layers, hidden, heads, mlp, vocab, seq), global batch,
#  micro-batch, (tensor, pipe, virtual stages, zero), recompute, attention, published, counting)
# `published`: ("tflops", TFLOP/s per device counted as `counting` says) or ("step_s", s).
# Grouped-query attention, SwiGLU and an attention width other than `hidden` become the dense
# block with the same matmul parameters (`_dense_mlp`).
_A100, _H100, _V5P = "a100_80gb", "h100", "tpu_v5p"
_GPT = 51200, 2048  # vocab, seq of the Megatron and Korthikanti GPT runs
# Blocks other than GPT's (attention width q, feed-forward width, KV heads, gated MLP):
_LLAMA = dict(q=16384, ffn=53248, kv_heads=8, gated=True)
_mt = lambda q, ffn, heads: dict(q=q, ffn=ffn, kv_heads=heads, gated=False)  # MaxText, ReLU
RUNS = [
    # Megatron-LM 2021: fp16, full recomputation, DDP (no sharded state), 1F1B (interleaved
    # where `virtual` > 1), fused softmax with attention dropout.
    ("megatron21_1.7b", "megatron21", _A100, 32, (24, 2304, 24, 9216, *_GPT), 512, 16,
     (1, 1, 1, 0), "full", "fused_softmax", ("tflops", 137), "megatron"),
    ("megatron21_3.6b", "megatron21", _A100, 64, (30, 3072, 32, 12288, *_GPT), 512, 16,
     (2, 1, 1, 0), "full", "fused_softmax", ("tflops", 138), "megatron"),
    ("megatron21_7.5b", "megatron21", _A100, 128, (36, 4096, 32, 16384, *_GPT), 512, 16,
     (4, 1, 1, 0), "full", "fused_softmax", ("tflops", 142), "megatron"),
    ("megatron21_18b", "megatron21", _A100, 256, (40, 6144, 48, 24576, *_GPT), 1024, 8,
     (8, 1, 1, 0), "full", "fused_softmax", ("tflops", 135), "megatron"),
    ("megatron21_39b", "megatron21", _A100, 512, (48, 8192, 64, 32768, *_GPT), 1536, 4,
     (8, 2, 1, 0), "full", "fused_softmax", ("tflops", 138), "megatron"),
    ("megatron21_76b", "megatron21", _A100, 1024, (60, 10240, 80, 40960, *_GPT), 1792, 2,
     (8, 4, 3, 0), "full", "fused_softmax", ("tflops", 140), "megatron"),
    ("megatron21_145b", "megatron21", _A100, 1536, (80, 12288, 96, 49152, *_GPT), 2304, 2,
     (8, 8, 2, 0), "full", "fused_softmax", ("tflops", 148), "megatron"),
    ("megatron21_310b", "megatron21", _A100, 1920, (96, 16384, 128, 65536, *_GPT), 2160, 1,
     (8, 16, 2, 0), "full", "fused_softmax", ("tflops", 155), "megatron"),
    ("megatron21_530b", "megatron21", _A100, 2520, (105, 20480, 128, 81920, *_GPT), 2520, 1,
     (8, 35, 3, 0), "full", "fused_softmax", ("tflops", 163), "megatron"),
    ("megatron21_1t", "megatron21", _A100, 3072, (128, 25600, 160, 102400, *_GPT), 3072, 1,
     (8, 64, 1, 0), "full", "fused_softmax", ("tflops", 163), "megatron"),
    # Korthikanti et al.: the same engine a year on; full-recomputation baselines.
    ("korthikanti22_22b", "korthikanti22", _A100, 8, (48, 6144, 64, 24576, *_GPT), 4, 4,
     (8, 1, 1, 0), "full", "fused_softmax", ("step_s", 1.42), "megatron"),
    ("korthikanti22_175b", "korthikanti22", _A100, 64, (96, 12288, 96, 49152, *_GPT), 64, 1,
     (8, 8, 3, 0), "full", "fused_softmax", ("step_s", 18.13), "megatron"),
    ("korthikanti22_530b", "korthikanti22", _A100, 280, (105, 20480, 128, 81920, *_GPT), 280, 1,
     (8, 35, 3, 0), "full", "fused_softmax", ("step_s", 49.05), "megatron"),
    ("korthikanti22_1t", "korthikanti22", _A100, 512, (128, 25600, 160, 102400, *_GPT), 512, 1,
     (8, 64, 1, 0), "full", "fused_softmax", ("step_s", 94.42), "megatron"),
    # ... and with their sequence parallelism and selective recomputation.
    ("korthikanti22_22b_sp", "korthikanti22", _A100, 8, (48, 6144, 64, 24576, *_GPT), 4, 4,
     (8, 1, 1, 0), "selective+sp", "fused_softmax", ("step_s", 1.10), "model"),
    ("korthikanti22_175b_sp", "korthikanti22", _A100, 64, (96, 12288, 96, 49152, *_GPT), 64, 1,
     (8, 8, 3, 0), "selective+sp", "fused_softmax", ("step_s", 13.75), "model"),
    ("korthikanti22_530b_sp", "korthikanti22", _A100, 280, (105, 20480, 128, 81920, *_GPT), 280,
     1, (8, 35, 3, 0), "selective+sp", "fused_softmax", ("step_s", 37.83), "model"),
    ("korthikanti22_1t_sp", "korthikanti22", _A100, 512, (128, 25600, 160, 102400, *_GPT), 512,
     1, (8, 64, 1, 0), "selective+sp", "fused_softmax", ("step_s", 71.49), "model"),
    # BLOOM-176B: Megatron-DeepSpeed, bf16, ZeRO-1, full recomputation (vocab padded to 250880).
    ("bloom_176b", "bloom", _A100, 384, (70, 14336, 112, 57344, 250880, 2048), 2048, 2,
     (4, 12, 1, 1), "full", "fused_softmax", ("tflops", 149.77), "megatron"),
    # Llama 3 405B: GQA (8 KV heads) + SwiGLU (53248), no recomputation, sharded optimizer
    # state and gradients, flash attention, micro-batch 1 (not stated).
    ("llama3_405b_8192", "llama3", _H100, 8192, (126, 16384, 128, _LLAMA, 128000, 8192),
     2048, 1, (8, 16, 1, 1), "none", "flash", ("tflops", 430), "model"),
    ("llama3_405b_16384", "llama3", _H100, 16384, (126, 16384, 128, _LLAMA, 128000,
     8192), 2048, 1, (8, 16, 1, 1), "none", "flash", ("tflops", 400), "model"),
    # MaxText on TPU v5p: FSDP (ZeRO-3) x tensor, flash attention, ReLU MLP, head_dim 256
    # (attention width `q` != hidden), per-device batch x chips.
    ("maxtext_v5p_32b", "maxtext", _V5P, 64, (32, 10240, 32, _mt(8192, 32768, 32), 32768, 2048), 512,
     None, (4, 1, 1, 3), "selective", "flash", ("tflops", 328), "maxtext"),
    ("maxtext_v5p_64b", "maxtext", _V5P, 64, (64, 10240, 32, _mt(8192, 32768, 32), 32768, 2048), 256,
     None, (4, 1, 1, 3), "selective", "flash", ("tflops", 323), "maxtext"),
    ("maxtext_v5p_128b", "maxtext", _V5P, 128, (64, 10240, 64, _mt(16384, 65536, 64), 32768, 2048),
     256, None, (8, 1, 1, 3), "selective", "flash", ("tflops", 315), "maxtext"),
    ("maxtext_v5p_256b", "maxtext", _V5P, 512, (64, 20480, 64, _mt(16384, 65536, 64), 32768, 2048),
     1024, None, (8, 1, 1, 3), "selective", "flash", ("tflops", 308), "maxtext"),
    ("maxtext_v5p_512b", "maxtext", _V5P, 512, (128, 20480, 64, _mt(16384, 65536, 64), 32768, 2048),
     1024, None, (16, 1, 1, 3), "full", "flash", ("tflops", 294), "maxtext"),
    ("maxtext_v5p_1024b", "maxtext", _V5P, 1024, (128, 20480, 128, _mt(32768, 131072, 128), 32768,
     2048), 2048, None, (16, 1, 1, 3), "full", "flash", ("tflops", 254), "maxtext"),
]
RUNS = [dict(zip(("id", "source", "device", "gpus", "model", "batch", "micro", "layout",
                  "recompute", "attention", "published", "counting"), r)) for r in RUNS]


def _block(run) -> dict:
  """The source's block: attention width q, feed-forward width, KV heads, gated MLP."""
  layers, hidden, heads, mlp, vocab, seq = run["model"]
  if isinstance(mlp, dict):
    return mlp
  return dict(q=hidden, ffn=mlp, kv_heads=heads, gated=False)


def block_matmul_params(run) -> int:
  """Matmul weights of one of the source's blocks: q, k, v (k and v narrowed by grouped-query
  attention), the output projection, and the MLP's 2 (3 when gated) matrices."""
  hidden, heads = run["model"][1], run["model"][2]
  b = _block(run)
  kv = b["q"] * b["kv_heads"] // heads
  return hidden * (2 * b["q"] + 2 * kv) + (3 if b["gated"] else 2) * hidden * b["ffn"]


def _dense_mlp(run) -> int:
  """The MLP width of rec_llm's block (4 d x d attention matrices, 2 MLP matrices) with the
  same matmul parameters, hence FLOPs, as the source's block."""
  hidden = run["model"][1]
  return (block_matmul_params(run) - 4 * hidden * hidden) // (2 * hidden)


def megatron_flops(run) -> float:
  """Megatron-LM's count per iteration (arXiv:2104.04473, eq. 3, used by Megatron-DeepSpeed's
  logs too): 96 B s l h^2 (1 + s / 6h + V / 16 l h), full recomputation's extra forward
  included."""
  layers, h, _, _, vocab, seq = run["model"]
  return 96.0 * run["batch"] * seq * layers * h ** 2 * (
      1 + seq / (6.0 * h) + vocab / (16.0 * layers * h))


def model_flops(run, causal: bool = False) -> float:
  """Model FLOPs per iteration, no recomputation (PaLM's MFU numerator: 6 x the matmul
  parameters, the logit layer's included, per token + 12 l q s for attention over the full
  square; `causal`: half the square, as MaxText counts)."""
  layers, hidden, _, _, vocab, seq = run["model"]
  matmul = layers * block_matmul_params(run) + hidden * vocab
  attention = 12.0 * layers * _block(run)["q"] * seq * (0.5 if causal else 1.0)
  return run["batch"] * seq * (6.0 * matmul + attention)


COUNTINGS = {"megatron": megatron_flops, "model": model_flops,
             "maxtext": lambda run: model_flops(run, causal=True)}


def _spec(run) -> cm.ModelSpec:
  layers, hidden, heads, _, vocab, seq = run["model"]
  return cm.ModelSpec(num_layers=layers, d_model=hidden, num_heads=heads, mlp_dim=_dense_mlp(run),
                      max_len=seq, num_items=vocab - 1, vocab_multiple=1, dtype="bfloat16",
                      attention=run["attention"], head="whole")


def source_plan(run) -> sim.Plan:
  tensor, pipe, virtual, zero = run["layout"]
  data = run["gpus"] // (tensor * pipe)
  micro = run["micro"] or run["batch"] // data  # None: the whole per-replica batch at once
  microbatches = run["batch"] // (data * micro)
  recompute = run["recompute"]
  return sim.Plan(data=data, tensor=tensor, pipe=pipe, schedule="1f1b", microbatches=microbatches,
                  remat=recompute == "full", selective=recompute.startswith("selective"),
                  sequence_parallel=recompute.endswith("+sp"), zero=zero, virtual=virtual,
                  lockstep=False, accumulate=pipe == 1 and microbatches > 1,
                  overlap_tensor=run["source"] == "maxtext",
                  zero_flat=True)  # (the sources' sharded optimizers split flat buffers)


def _simulate(run, efficiency: float | None = None):
  """(result, predicted TFLOP/s per device counted as the source counts, predicted /
  published throughput - 1) on the device's preset (its matmul efficiency replaced by
  `efficiency` when given)."""
  c = cluster_lib.preset(run["device"], run["gpus"])
  if efficiency is not None:
    c = dataclasses.replace(c, efficiency=efficiency)
  res = sim.simulate(_spec(run), sim.Batch(run["batch"], run["model"][5]), c, source_plan(run))
  tflops = COUNTINGS[run["counting"]](run) / res.step_s / run["gpus"] / 1e12
  kind, value = run["published"]
  # throughput, predicted over published (a published step time: its inverse)
  return res, tflops, (value / res.step_s if kind == "step_s" else tflops / value) - 1


def fit_efficiency(run, lo: float = 0.2, hi: float = 1.0) -> float:
  """The matmul efficiency (share of the datasheet peak) at which `run` is reproduced exactly
  (bisection: the error rises with the efficiency)."""
  for _ in range(40):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if _simulate(run, mid)[2] < 0 else (lo, mid)
  return (lo + hi) / 2


def reproduce(run, efficiency: float | None = None) -> dict:
  res, tflops, err = _simulate(run, efficiency)
  kind, value = run["published"]
  return {"id": run["id"], "source": run["source"], "device": run["device"], "gpus": run["gpus"],
          "model": dict(zip(("layers", "hidden", "heads", "mlp", "vocab", "seq"), run["model"])),
          "batch": run["batch"], "plan": dataclasses.asdict(res.plan), "counting": run["counting"],
          "published": {kind: value}, "predicted": {"step_s": res.step_s, "tflops": tflops},
          "simulated_dense_mlp": _dense_mlp(run),
          "rel_err": err, "within_tolerance": abs(err) <= _TOLERANCE,
          "step_s": res.step_s, "fits": res.fits, "memory_gib": res.memory["total"] / 2**30,
          "breakdown": res.breakdown}


# One matmul efficiency per device kind, fitted on one run each (the first of a source's
# table); every other run on that device is a prediction with it.
FIT_ON = {"a100_80gb": "megatron21_1.7b", "h100": "llama3_405b_8192",
          "tpu_v5p": "maxtext_v5p_32b"}


def planner_pick(run, efficiency: float, source_s: float) -> dict:
  """The planner's best plan for the run's model, batch and cluster (rec_llm's engine: no
  compression, lock-step pipeline ticks, no interleaving, accumulation or sequence
  parallelism), its throughput relative to the source's layout as the source runs it
  (`source_s`: that layout's simulated step at this efficiency)."""
  c = dataclasses.replace(cluster_lib.preset(run["device"], run["gpus"]), efficiency=efficiency)
  best, stats = planner.plan(_spec(run), sim.Batch(run["batch"], run["model"][5]), c, top=1,
                             options=planner.Options(compressions=("none",)))
  if not best:
    return {"fits": False, "considered": stats["considered"], "seconds": stats["seconds"]}
  return {**best[0].row(), "vs_source_layout": source_s / best[0].step_s,
          "considered": stats["considered"], "seconds": stats["seconds"]}


def _line(r, key) -> str:
  (kind, value), = r["published"].items()
  p = r[key]
  return (f"{r['id']:20s} {r['gpus']:5d} x {r['device']:9s} {kind} published {value:7.2f}  "
          f"{key} {p['predicted'][kind]:7.2f} ({100 * p['rel_err']:+6.1f}%)")


def main(argv):
  del argv
  t = time.perf_counter()
  by_id = {r["id"]: r for r in RUNS}
  fitted = {dev: fit_efficiency(by_id[rid]) for dev, rid in FIT_ON.items()}
  rows = []
  for run in RUNS:
    row = reproduce(run)
    row["datasheet"] = {k: row.pop(k) for k in ("predicted", "rel_err", "within_tolerance")}
    fit = reproduce(run, fitted[run["device"]])
    row["fitted"] = {"efficiency": fitted[run["device"]], "fitted_on": FIT_ON[run["device"]],
                     "held_out": run["id"] != FIT_ON[run["device"]],
                     **{k: fit[k] for k in ("predicted", "rel_err", "within_tolerance")}}
    row["planner"] = planner_pick(run, fitted[run["device"]], fit["predicted"]["step_s"])
    rows.append(row)
    print(_line(row, "datasheet") + "   " + _line(row, "fitted")[56:])
  summary = {"datasheet_within": sum(r["datasheet"]["within_tolerance"] for r in rows),
             "held_out": sum(r["fitted"]["held_out"] for r in rows),
             "held_out_within": sum(r["fitted"]["within_tolerance"] for r in rows
                                    if r["fitted"]["held_out"]),
             "runs": len(rows), "fitted_efficiency": fitted,
             "sources_within": sorted({r["source"] for r in rows if r["fitted"]["held_out"]
                                       and r["fitted"]["within_tolerance"]}),
             "seconds": time.perf_counter() - t}
  print(f"datasheet presets: {summary['datasheet_within']}/{len(rows)} within "
        f"{100 * _TOLERANCE:.0f}%; one efficiency per device fitted on {len(FIT_ON)} runs "
        f"({', '.join(f'{d} {e:.3f}' for d, e in fitted.items())}): "
        f"{summary['held_out_within']}/{summary['held_out']} held-out runs within")
  common.write(_OUT.value, {"benchmark": "published", "tolerance": _TOLERANCE,
                            "sources": SOURCES, "rows": rows, "summary": summary})


if __name__ == "__main__":
  app.run(main)
