"""The experiment layer: sweep runner, paper tables, the results notebook, benchmark entry points."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT
from tests.helpers import one_error

# A small simulated sweep with every group the tables read (rec_llm.sim only: a second).
SIM_SWEEP = """
import ml_collections
def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.name = "tiny_sim"
  c.defaults = dict(config="experiments/configs/large_1b.py",
                    overrides=dict(data=dict(num_items=200_000)), clusters=("h100x8",),
                    rows_per_device=8, staleness=2, local_steps=8, trace=False)
  c.groups = [
      dict(name="strategies", meshes=("dp", "tp", "pp", "hybrid"), compressions=("none", "int8"),
           trace=True),
      dict(name="scaling", clusters=("h100x128",), devices=(8, 16), meshes=("dp", "hybrid")),
      dict(name="dp_modes", meshes=("dp", "hybrid"), dp_modes=("sync", "stale", "local_sgd")),
  ]
  return c
"""

# Measured on the 8 virtual devices: the smoke model, one mesh, 2 steps; and its prediction.
MEASURED_SWEEP = """
import ml_collections
def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.name = "tiny_measured"
  c.groups = [dict(name="local", config="experiments/configs/smoke.py", meshes=("4x2x1",),
                   sources=("measured", "simulated"), clusters=("this_machine",), steps=2)]
  return c
"""

COMPRESSION = {"provenance": {"command": "python -m benchmarks.compression (synthetic, test)",
                              "git_commit": "0" * 40, "device_kind": "cpu", "num_devices": 8},
               "mesh": "data=4 x tensor=2", "results": [
                   dict(point=p, dp_bytes_hlo=b, dp_bytes_analytic=b, compression_ratio=985368 / b,
                        step_time_s=0.5, **{"test/ndcg@10": q, "test/hr@10": 2 * q},
                        ndcg10_vs_dense=q / 0.0593)
                   for p, b, q in [("dense", 985368, 0.0593), ("int8", 251184, 0.0593),
                                   ("topk1", 22284, 0.0218), ("sign", 32496, 0.0208),
                                   ("stale2", 985368, 0.0570), ("local8", 123171, 0.0550)]]}


# benchmarks.dp_methods' summary of synthetic runs (its flags stay out of this process).
DP_METHODS = """
import json, sys
from benchmarks.dp_methods import summarise
runs = [dict(point=p, seed=s, steps_per_epoch=47, **{"test/ndcg@10": q, "test/hr@10": 2 * q,
             "test/hr@50": 0.5, "test/hr@200": 0.7})
        for p, s, q in [("dense", 0, 0.16), ("dense", 1, 0.18), ("local8", 0, 0.17),
                        ("topk0.1_adam", 0, 0.10)]]
bytes_ = {"dense": dict(dp_bytes_hlo=1000.0, sync_every=1),
          "local8": dict(dp_bytes_hlo=125.0, sync_every=8),
          "topk0.1_adam": dict(dp_bytes_hlo=4.0, sync_every=1)}
json.dump({"provenance": {"command": "synthetic"}, "mesh": "data=4", "protocol": "test",
           "summary": summarise(runs, bytes_), "runs": runs}, open(sys.argv[1], "w"))
"""


def cli(module, *args, env=None, timeout=120):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout, env={**os.environ, **(env or {})})


def write(path, text):
  path.write_text(textwrap.dedent(text))
  return str(path)


def tables(markdown):
  """Markdown tables as lists of cell rows (header first, separator dropped)."""
  out, cur = [], []
  for line in markdown.splitlines() + [""]:
    if line.startswith("|"):
      if "---" not in line:
        cur.append([c.strip() for c in line.strip("|").split("|")])
    elif cur:
      out.append(cur)
      cur = []
  return out


def rows_of(workdir):
  with open(os.path.join(workdir, "results.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def sim_results(tmp_path_factory):
  """(workdir of the small simulated sweep, a synthetic compression.json)."""
  tmp = tmp_path_factory.mktemp("sim")
  config = write(tmp / "sweep.py", SIM_SWEEP)
  workdir = str(tmp / "work")
  p = cli("experiments.sweep", f"--config={config}", f"--workdir={workdir}")
  assert p.returncode == 0, p.stderr[-3000:]
  assert "[1/" in p.stderr  # progress: i/N with an ETA
  comp = tmp / "compression.json"
  comp.write_text(json.dumps(COMPRESSION))
  return workdir, str(comp), config


def test_simulated_sweep_rows_and_rerun_skips(sim_results):
  workdir, _, config = sim_results
  rows = rows_of(workdir)
  assert len({r["key"] for r in rows}) == len(rows) > 10
  by = {(r["group"], r["point"]["mesh"], r["point"]["compression"], r["point"]["dp_mode"],
         r["point"]["devices"]): r for r in rows}
  hybrid = by[("strategies", "hybrid", "none", "sync", None)]
  assert hybrid["status"] == "ok" and hybrid["source"] == "simulated"
  assert hybrid["cluster"] == "h100x8" and hybrid["tokens_per_s"] > 0 and 0 < hybrid["mfu"] < 1
  assert {"compute", "tensor_comm", "dp_comm", "dp_exposed", "bubble_s"} <= set(hybrid["breakdown"])
  assert hybrid["config"]["data"]["num_items"] == 200_000  # the run config, overrides applied
  assert hybrid["config"]["train"]["batch_size"] == 64     # 8 rows x 8 devices
  prov = hybrid["provenance"]
  assert len(prov["git_commit"]) == 40 and prov["jax_version"] and prov["device_kind"]
  pp = by[("strategies", "pp", "none", "sync", None)]
  assert pp["plan"]["pipe"] == 8 and os.path.exists(os.path.join(workdir, pp["trace"]))
  assert by[("scaling", "dp", "none", "sync", 16)]["mesh"] == "16x1x1"
  assert by[("dp_modes", "dp", "none", "stale", None)]["compression"].endswith("stale2")
  # Again: nothing new is appended.
  p = cli("experiments.sweep", f"--config={config}", f"--workdir={workdir}")
  assert p.returncode == 0, p.stderr[-2000:]
  assert f"{len(rows)} already done, 0 ok" in p.stdout, p.stdout
  assert len(rows_of(workdir)) == len(rows)


def test_measured_sweep_in_process_and_rerun_skips(tmp_path):
  from experiments import points, sweep
  config = points.load_config_file(write(tmp_path / "sweep.py", MEASURED_SWEEP))
  workdir = str(tmp_path / "work")
  counts = sweep.sweep(config, workdir)
  assert counts == {"points": 2, "skipped": 0, "ok": 2, "infeasible": 0, "error": 0}
  rows = rows_of(workdir)
  meas = next(r for r in rows if r["source"] == "measured")
  assert meas["mesh"] == "4x2x1" and meas["devices"] == 8 and meas["device_kind"] == "cpu"
  assert len(meas["step_times_s"]) == 2 and meas["step_time_s"] == meas["step_times_s"][1]
  assert meas["tokens_per_s"] > 0 and meas["mfu"] > 0 and meas["cluster"] is None
  assert meas["config"]["train"]["steps"] == 2
  assert meas["point"]["config"] == "experiments/configs/smoke.py"
  assert meas["key"] == points.key(meas["point"])  # stable: a hash of the point alone
  assert meas["provenance"]["device_kind"] == "cpu" and meas["provenance"]["num_devices"] == 8
  sim = next(r for r in rows if r["source"] == "simulated")
  assert sim["cluster"] == "this_machine" and sim["mesh"] == "4x2x1"
  again = sweep.sweep(config, workdir)
  assert again["skipped"] == 2 and again["ok"] == 0 and len(rows_of(workdir)) == 2


def test_paper_tables_all_four(sim_results, tmp_path):
  workdir, comp, _ = sim_results
  out = tmp_path / "tables.md"
  dpm = tmp_path / "dp_methods.json"
  p = subprocess.run([sys.executable, "-c", DP_METHODS, str(dpm)], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  assert p.returncode == 0, p.stderr[-3000:]
  p = cli("experiments.paper_tables", f"--results={workdir}", f"--out={out}",
          f"--compression={comp}", f"--dp_methods={dpm}")
  assert p.returncode == 0, p.stderr[-3000:]
  text = out.read_text()
  # the full-run table: means over seeds, ratios to dense's mean, syncs per epoch
  full = next(t for t in tables(text) if "syncs/epoch" in t[0])
  by = {r[0]: dict(zip(full[0], r)) for r in full[1:]}
  assert by["dense"]["NDCG@10"] == "0.1700 ± 0.0100" and by["dense"]["seeds"] == "2"
  assert by["local8"]["ratio"] == "8.0" and by["local8"]["syncs/epoch"] == "5.9"
  assert by["local8"]["NDCG@10 / dense"] == "1.000" and by["local8"]["keeps"] == "yes"
  assert by["topk0.1_adam"]["ratio"] == "250.0" and by["topk0.1_adam"]["keeps"] == "no"
  for head in ("## (a)", "## (b)", "## (c)", "## (d)"):
    assert head in text
  assert "Without compression: hybrid" in text and "throughput" in text and "MFU" in text
  assert "pure DP" in text and "pure TP" in text and "pure PP" in text
  if "**below**" in text:  # short of 1.30x: the breakdown explains why
    assert "Simulated step breakdown" in text and "DP exposed" in text
  assert "scaling eff." in text and "| 16 |" in text
  assert "| topk1 |" in text and "measured (ML-1M)" in text and "| yes |" in text  # Pareto
  assert "stale (tau 2)" in text and "local SGD (H 8)" in text
  sourced = 0
  for tbl in tables(text):  # every row of a table with a source column names it
    if "source" in tbl[0]:
      sourced += 1
      col = tbl[0].index("source")
      assert all("simulated" in r[col] or "measured" in r[col] for r in tbl[1:]), tbl
  assert sourced >= 5
  # Without the benchmark's file the tables say so.
  p = cli("experiments.paper_tables", f"--results={workdir}", f"--out={out}",
          f"--compression={tmp_path / 'none.json'}")
  assert p.returncode == 0 and "is missing" in out.read_text()


def test_notebook_executes(sim_results):
  import nbformat
  from nbclient import NotebookClient
  workdir, comp, _ = sim_results
  nb = nbformat.read(os.path.join(ROOT, "notebooks", "explore_results.ipynb"), as_version=4)
  assert nb.cells[1].source.startswith("RESULTS = ")  # the first code cell holds the paths
  nb.cells[1].source = f"RESULTS = {workdir!r}\nCOMPRESSION = {comp!r}"
  NotebookClient(nb, kernel_name="python3", timeout=120,
                 resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert len(images) == 4  # throughput vs devices, Pareto front, pipeline timeline, time to quality


BAD = [
    ("""
     import ml_collections
     def get_config(arg=None):
       return ml_collections.ConfigDict(dict(name="x", groups=[dict(name="g", meshs=("4x2x1",))]))
     """, "unknown key(s) ['meshs']"),
    ("""
     import ml_collections
     def get_config(arg=None):
       return ml_collections.ConfigDict(dict(name="x", groups=[dict(name="g", clusters=("tpu9",))]))
     """, "cluster 'tpu9' is unknown"),
    ("""
     import ml_collections
     def get_config(arg=None):
       return ml_collections.ConfigDict(dict(name="x", groups=[
           dict(name="g", sources=("measured",), meshes=("hybrid",))]))
     """, "exists only for simulated points"),
    ("""
     import ml_collections
     def get_config(arg=None):
       return ml_collections.ConfigDict(dict(name="x", groups=[
           dict(name="g", overrides=dict(model=dict(n_layers=3)))]))
     """, "override 'model.n_layers'"),
    ("""
     import ml_collections
     def get_config(arg=None):
       return ml_collections.ConfigDict(dict(name="x"))
     """, "a sweep config needs `groups`"),
]


def test_bad_sweep_config_one_error_line(tmp_path):
  for i, (text, needle) in enumerate(BAD):
    config = write(tmp_path / f"bad{i}.py", text)
    one_error(cli("experiments.sweep", f"--config={config}", f"--workdir={tmp_path / 'w'}"), needle)
  one_error(cli("experiments.sweep", f"--config={tmp_path / 'missing.py'}", "--workdir=/tmp/x"),
            "cannot load the config file")
  assert not os.path.exists(tmp_path / "w")  # nothing ran


def test_gpu_1b_refuses_on_cpu_and_dry_run_writes_json(tmp_path):
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  one_error(cli("benchmarks.gpu_1b", f"--out={tmp_path / 'x.json'}", env=env), "needs a GPU")
  out = tmp_path / "dry.json"
  p = cli("benchmarks.gpu_1b", "--dry_run", f"--out={out}", env=env)
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r["dry_run"] and r["config"]["model"]["dtype"] == "bfloat16"
  assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["memory"]["peak_bytes"] > 0
  assert r["provenance"]["jax_version"] and r["provenance"]["device_kind"] == "cpu"


def test_run_all_lists_and_rejects_unknown():
  p = cli("benchmarks.run_all", "--list", "--skip=gpu_1b", "--out_dir=/tmp/res")
  assert p.returncode == 0, p.stderr[-2000:]
  names = [l.split(":")[0] for l in p.stdout.splitlines()]
  assert names == ["step_time", "pipeline", "memory", "compression", "sim_calibration",
                   "numerics_shakeout", "published", "adaptive_balance", "dp_methods"]
  assert "--out=/tmp/res/compression.json" in p.stdout
  one_error(cli("benchmarks.run_all", "--only=step_time,nope"), "unknown benchmark(s) ['nope']")


def test_readme_headline_matches_the_committed_tables():
  """The ratios README.md and docs/results.md quote are the committed paper_tables.md's."""
  lines = open(os.path.join(ROOT, "experiments/results/paper_tables.md")).read().splitlines()
  summary = {}
  for line in lines[lines.index("## Summary: hybrid / best single strategy"):]:
    cells = [c.strip() for c in line.strip("|").split("|")]
    if len(cells) == 9 and cells[5].startswith("**"):
      summary[cells[0], cells[1], cells[2]] = cells[5].strip("*")
  get = lambda group, cluster, comp: summary[group, cluster, f"{comp} compression"]
  one, many = ("strategies", "h100x8"), ("strategies", "h100x128")
  readme = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
  assert (f"the hybrid reaches {get(*one, 'without')} the best single strategy on 8 GPUs and "
          f"{get(*many, 'without')} on 128 without compression, {get(*one, 'with')} / "
          f"{get(*many, 'with')} with it") in readme
  for group, words in (("strategies_2m", "the 2M-item table"), ("strategies_7b", "a 7B model"),
                       ("strategies_61b", "a 61B model on 1,024 GPUs")):
    assert f"{words} {get(group, 'h100x128', 'without')}" in readme, group
  results = open(os.path.join(ROOT, "docs/results.md")).read()
  for cluster, comp, key in (("h100x8 (1 node)", "none", (*one, "without")),
                             ("h100x8 (1 node)", "best compressed", (*one, "with")),
                             ("h100x128 (16 nodes)", "none", (*many, "without")),
                             ("h100x128 (16 nodes)", "best compressed", (*many, "with")),
                             ("mixed_a100_h100 (2 A100 + 2 H100 nodes)", "none",
                              ("strategies_mixed", "mixed_a100_h100", "without"))):
    row = [l for l in results.splitlines() if l.startswith(f"| {cluster} | {comp} |")]
    assert len(row) == 1 and f"| {get(*key)} | {get(*key)} |" in row[0], (cluster, comp, row)
