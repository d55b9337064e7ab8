"""Bad input ends in one clear `error:` line and exit code 2, never a traceback."""

import pytest

from tests.helpers import one_error, run_trainer

SMOKE = "--config=experiments/configs/smoke.py"

BAD = [
    ([SMOKE, "--config.mesh.data=3", "--host_devices=8"], "= 6 but there are 8 devices"),
    ([SMOKE, "--config.mesh.data=-1", "--config.mesh.tensor=-1"], "at most one axis may be -1"),
    ([SMOKE, "--config.mesh.tensor=0"], "mesh.tensor=0 is invalid"),
    ([SMOKE, "--config.mesh.data=1", "--config.mesh.tensor=8"], "num_heads=4 is not divisible by mesh.tensor=8"),
    ([SMOKE, "--config.model.d_model=30"], "d_model=30 is not divisible by model.num_heads=4"),
    ([SMOKE, "--config.mesh.data=8", "--config.mesh.tensor=1", "--config.train.batch_size=12"],
     "batch_size=12 is not divisible by mesh.data=8"),
    ([SMOKE, "--config.data.name=netflix"], "unknown data.name='netflix'"),
    ([SMOKE, "--config.train.learning_rate=-1.0"], "train.learning_rate=-1.0 must be in (0, inf)"),
    # Non-finite and out-of-range floats (rec_llm/train/config_check.FLOAT_RANGES).
    ([SMOKE, "--config.train.learning_rate=nan"], "train.learning_rate=nan must be in (0, inf)"),
    ([SMOKE, "--config.train.b2=1.5"], "train.b2=1.5 must be in [0, 1)"),
    ([SMOKE, "--config.dp.outer_momentum=inf"], "dp.outer_momentum=inf must be in [0, 1)"),
    ([SMOKE, "--config.model.dropout_rate=0.001"], "dropout_rate=0.001 rounds to 0"),
    ([SMOKE, "--config.model.block=mamba"], "model.block='mamba' is unknown; choose one of"),
    ([SMOKE, "--config.model.dropout_bits=philox"], "model.dropout_bits='philox'; choose"),
    ([SMOKE, "--config.mesh.pipe=2", "--config.mesh.data=2", "--config.pipeline.schedule=zigzag"],
     "pipeline.schedule='zigzag' is unknown"),
    ([SMOKE, "--config.mesh.pipe=2", "--config.mesh.data=2", "--config.pipeline.stage_layers=(1,3)"],
     "sums to 4 but model.num_layers=2"),
    ([SMOKE, "--config.mesh.pipe=2", "--config.mesh.data=4", "--config.mesh.tensor=1",
      "--config.pipeline.microbatches=3"],
     "pipeline.microbatches=3 does not divide the 8 rows"),
    ([SMOKE, "--config.mesh.pipe=4", "--config.mesh.data=2", "--config.mesh.tensor=1"], "mesh.pipe=4 stages but model.num_layers=2"),
    ([SMOKE, "--config.mesh.expert=2"], "unknown config key 'expert'"),
    ([SMOKE, "--config.train.steps=abc"], "invalid literal for int()"),
    (["--config=experiments/configs/no_such.py"], "cannot load the config file"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[n for _, n in BAD])
def test_bad_input_gives_one_line_error(args, needle):
  one_error(run_trainer(args, timeout=60), needle)


@pytest.mark.parametrize("edit,needle", [
    ("c.train.lerning_rate = 1e-3",
     "unknown config key train.lerning_rate; did you mean train.learning_rate?"),
    ("del c.dp.compression.rank", "the config lacks dp.compression.rank; start from"),
], ids=["typo", "missing"])
def test_config_file_fields_match_default(tmp_path, edit, needle):
  """A config file's keys are checked against experiments/configs/default.py (the one place
  a default is written), so a typo is an error rather than a silently ignored setting."""
  path = tmp_path / "cfg.py"
  path.write_text("from experiments.configs import smoke\n\n\ndef get_config(arg=None):\n"
                  f"  c = smoke.get_config(arg)\n  {edit}\n  return c\n")
  one_error(run_trainer([f"--config={path}"], timeout=60), needle)
