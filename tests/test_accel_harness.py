"""The accelerator harness and the real-GPU script, run on the CPU.

The compile-only harness (``benchmarks/accel``) and ``benchmarks/gpu_steps.py``
are written for TPU and GPU targets that this environment does not hold
(neither libtpu nor the CUDA plugin is installed here): these tests import
them, parse hand-written HLO, and run their CPU dry runs on eight fake CPU
devices, checking the figures against the byte counts of the tiny decoder's
parameters worked out by hand.
"""

import json
import pathlib
import sys

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from benchmarks import gpu_steps  # noqa: E402
from benchmarks.accel import cli  # noqa: E402
from benchmarks.accel import matrix  # noqa: E402
from benchmarks.accel import metrics  # noqa: E402
from benchmarks.accel import model  # noqa: E402
from benchmarks.accel import recipe  # noqa: E402
from benchmarks.accel import rows  # noqa: E402
from benchmarks.accel import tables  # noqa: E402
from benchmarks.accel import targets  # noqa: E402

# The tiny decoder: vocab 512, width 64, 2 layers, 4 heads of 16 (2 for keys
# and values), MLP 128: embedding and unembedding 2 * 512 * 64, the final
# norm 64, per layer two norms 2 * 64, wq and wo 64 * 64 each, wk and wv
# 64 * 32 each, three MLP matrices 64 * 128.
TINY_PARAMS = (
  2 * 512 * 64 + 64 + 2 * (2 * 64 + 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
)


def test_tiny_decoder_has_the_counted_params_and_a_large_leaf():
  config = model.CONFIGS["tiny"]
  assert model.num_params(config) == TINY_PARAMS == 139584
  for scan in (True, False):
    leaves = jax.tree.leaves(model.abstract_params(config, scan))
    assert sum(leaf.size for leaf in leaves) == TINY_PARAMS
    assert max(leaf.size for leaf in leaves) >= 0.2 * TINY_PARAMS


def test_llama_shapes_are_1b_and_8b():
  # Llama 3.2 1B's shapes with the embedding untied from the output layer.
  assert model.num_params(model.CONFIGS["1b"]) == 1_498_482_688
  assert 7.9e9 < model.num_params(model.CONFIGS["8b"]) < 8.1e9


def test_full_matrix_covers_every_row_and_the_main_rows_on_every_target():
  jobs = matrix.plan("full")
  for target in ("v5e-256", "h100x8"):
    at_1b = {j.row for j in jobs if j.target == target and j.model == "1b"}
    assert at_1b == set(rows.ROWS)
  for target, size in [
    ("v5e-256", "8b"),
    ("h100x8", "8b"),
    ("h200x8", "8b"),
    ("v5p-128", "1b"),
    ("v6e-256", "1b"),
    ("v5e-256x2", "1b"),
  ]:
    found = {j.row for j in jobs if j.target == target and j.model == size}
    assert set(rows.MAIN) <= found, target
  kinds = {(j.program, j.layout, j.sharding) for j in jobs}
  assert {("train", "scan", "fsdp"), ("train", "unrolled", "fsdp")} <= kinds
  assert ("train", "scan", "fsdp+tp") in kinds
  assert len({j.key for j in jobs}) == len(jobs)


def test_every_row_has_its_baseline_in_the_same_configuration():
  for row in rows.ROWS.values():
    assert row.baseline in rows.ROWS
    assert rows.ROWS[row.baseline].param_dtype == row.param_dtype


def test_targets_name_their_gpu_specs_and_versions_are_recorded():
  for target in targets.TARGETS.values():
    if target.platform == "cuda":
      text = (targets.DATA / target.spec).read_text()
      assert "gpu_device_info" in text and "core_count: 132" in text
  found = targets.versions()
  assert found["jax"] == jax.__version__
  assert {"jaxlib", "libtpu", "jax-cuda12-plugin", "XLA_FLAGS"} <= set(found)


HLO = """\
HloModule step, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%fused_add (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %add = f32[8]{0} add(f32[8]{0} %p, f32[8]{0} %p)
}

%average (t: (f32[8], f32[8])) -> (f32[8], f32[8]) {
  %t = (f32[8]{0}, f32[8]{0}) parameter(0)
  %a = f32[8]{0} get-tuple-element((f32[8]{0}, f32[8]{0}) %t), index=0
  %f1 = f32[8]{0} fusion(f32[8]{0} %a), kind=kLoop, calls=%fused_add
  %f2 = f32[8]{0} fusion(f32[8]{0} %f1), kind=kLoop, calls=%fused_add
  ROOT %r = (f32[8]{0}, f32[8]{0}) tuple(f32[8]{0} %f1, f32[8]{0} %f2)
}

%skip (t: (f32[8], f32[8])) -> (f32[8], f32[8]) {
  ROOT %t = (f32[8]{0}, f32[8]{0}) parameter(0)
}

ENTRY %main (x: f32[8], pred: pred[]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %pred = pred[] parameter(1)
  %ag = f32[64]{0} all-gather(f32[8]{0} %x), dimensions={0}
  %ars = f32[8]{0} all-reduce-start(f32[8]{0} %x), to_apply=%fused_add
  %ard = f32[8]{0} all-reduce-done(f32[8]{0} %ars)
  %cs = (f32[8]{0:S(5)}, f32[8]{0}, u32[]) copy-start(f32[8]{0} %x)
  %cd = f32[8]{0:S(5)} copy-done((f32[8]{0:S(5)}, f32[8]{0}, u32[]) %cs)
  %pf = (f32[8]{0:S(1)}, f32[8]{0}, u32[]) copy-start(f32[8]{0} %x)
  %t = (f32[8]{0}, f32[8]{0}) tuple(f32[8]{0} %x, f32[8]{0} %ard)
  %c = (f32[8]{0}, f32[8]{0}) conditional(pred[] %pred, (f32[8]{0}, f32[8]{0}) %t, (f32[8]{0}, f32[8]{0}) %t), true_computation=%average, false_computation=%skip
  %g = f32[8]{0} get-tuple-element((f32[8]{0}, f32[8]{0}) %c), index=0
  ROOT %out = f32[8]{0} fusion(f32[8]{0} %g), kind=kLoop, calls=%fused_add
}
"""  # noqa: E501


def test_opcode_reads_tuple_shapes_and_plain_ones():
  assert metrics.opcode("%a = f32[8]{0} fusion(f32[8]{0} %x), kind=kLoop") == "fusion"
  line = "ROOT %r = (f32[8]{0}, (s32[], f32[2]{0:T(128)})) tuple(%a, %b)"
  assert metrics.opcode(line) == "tuple"
  assert metrics.opcode("%p = f32[8]{0} parameter(0)") == "parameter"
  assert metrics.opcode("no instruction here") is None


def test_hlo_summary_counts_fusions_collectives_branches_and_host_copies():
  found = metrics.hlo_summary(HLO)
  assert found["fusions_entry"] == 1
  assert found["fusions_branches"] == [[0, 2]]  # false branch first
  assert found["fusions_averaging_branch"] == 2
  assert found["collectives"] == {"all-gather": 1, "all-reduce": 1}
  assert found["conditionals"] == 1 and found["loops"] == 0
  assert found["host_transfers"] == 1  # the S(1) prefetch is not one
  assert found["host_memory_in_hlo"]


def test_forced_branch_picks_a_branch_of_the_package_and_restores_lax():
  cond, while_loop = jax.lax.cond, jax.lax.while_loop
  here = __name__.split(".")[0]  # the functions below belong to this module
  with matrix.forced_branch(True, package=here):
    assert jax.lax.cond(False, lambda x: x + 1, lambda x: x, 1) == 2
    assert jax.lax.while_loop(lambda c: c < 0, lambda c: c + 5, 0) == 5
  with matrix.forced_branch(False, package=here):
    assert jax.lax.cond(True, lambda x: x + 1, lambda x: x, operand=1) == 1
    assert jax.lax.while_loop(lambda c: c < 9, lambda c: c + 5, 0) == 0
  with matrix.forced_branch(True):  # optax_ema's only: these run as written
    assert jax.lax.cond(False, lambda x: x + 1, lambda x: x, 1) == 1
    assert jax.lax.while_loop(lambda c: c < 9, lambda c: c + 5, 0) == 10
  assert (jax.lax.cond, jax.lax.while_loop) == (cond, while_loop)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("accel") / "accel")
  report = cli.run("dry-run", out, quiet=True)
  return out, report


def _result(report, program, row):
  (found,) = [
    r for r in report["results"] if r["program"] == program and r["row"] == row
  ]
  return found


def test_dry_run_compiles_every_job_and_writes_its_files(dry_run):
  out, report = dry_run
  assert report["errors"] == []
  assert len(report["results"]) == len(matrix.plan("dry-run"))
  with open(out + ".json") as f:
    assert json.load(f)["versions"]["jax"] == jax.__version__
  text = pathlib.Path(out + ".md").read_text()
  assert "| row | device peak |" in text and "cpu8 / tiny / opt / scan / fsdp" in text
  assert len(pathlib.Path(out + ".txt").read_text().splitlines()) == len(
    report["results"]
  )


def test_dry_run_bytes_per_chip_match_the_params(dry_run):
  _, report = dry_run
  adam = _result(report, "opt", "adam")
  fused = _result(report, "opt", "hand-fused")
  # FSDP over 8 devices shards every matrix on its width; the three (64,)
  # norms are replicated: each device holds 1/8 of the rest and all of them.
  norms = 64 * 5
  per_chip = 4 * ((TINY_PARAMS - norms) // 8 + norms)
  assert adam["param_bytes"] == per_chip
  # adam keeps two moments and a count; one average adds one param copy.
  assert adam["state_bytes"] == 2 * per_chip + 4
  assert fused["state_bytes"] - adam["state_bytes"] == per_chip
  assert fused["d_peak"] == pytest.approx(1.0, abs=0.01)
  assert adam["traffic_x"] < fused["traffic_x"] == 1.0


def test_dry_run_branches_of_a_gated_step(dry_run):
  _, report = dry_run
  gated = _result(report, "opt", "update_every=10")
  assert gated["conditionals"] == 1 and gated["fusions_averaging_branch"] > 0
  avg, skip = gated["averaging_branch"], gated["skip_branch"]
  # Averaging reads the new params and the average and writes the average:
  # three param copies more than a skip step moves.
  moved = (avg["bytes_accessed"] - skip["bytes_accessed"]) / gated["param_bytes"]
  assert moved == pytest.approx(3.0, abs=0.1)
  assert _result(report, "opt", "adam")["conditionals"] == 0


def test_dry_run_train_step_has_collectives(dry_run):
  _, report = dry_run
  train = _result(report, "train", "moving_average")
  base = _result(report, "train", "adam")
  assert sum(train["collectives"].values()) > 0
  assert train["d_state"] == pytest.approx(1.0, abs=0.01)
  assert base["loops"] == 0  # unrolled layers


def test_gpu_script_dry_run_measures_every_row(tmp_path):
  out = tmp_path / "gpu.json"
  report = gpu_steps.main(["--dry-run", "--out", str(out)])
  assert json.loads(out.read_text())["dry_run"]
  found = {r["row"]: r for r in report["rows"]}
  assert set(found) == set(gpu_steps.rows())
  for r in found.values():
    assert r["num_params"] == TINY_PARAMS
    assert r["median_ms"] > 0 and r["complete_ms_per_step"] > 0
    assert 0 < r["dispatch_over_complete"] <= 1
  assert found["hand-fused, cond, every 10"]["conditionals"] == 1
  assert found["hand-fused, while_loop, every 10"]["loops"] == 1
  select = found["hand-fused, select, every 10"]
  assert select["conditionals"] == 0 and select["loops"] == 0


def test_pivot_tables_mark_jobs_not_run(dry_run):
  _, report = dry_run
  text = tables.pivot(
    report["results"],
    [
      ("cpu", {"target": "cpu8", "program": "opt"}, "d_peak"),
      ("tpu", {"target": "v5e-256", "program": "opt"}, "d_peak"),
    ],
    ["hand-fused", "power_ema"],
  )
  lines = text.splitlines()
  assert lines[0] == "| row | cpu | tpu |"
  assert lines[2] == "| hand-fused | +1.00x | n/r |"
  assert len(lines) == 3  # power_ema ran nowhere: no line


def test_recipe_compiles_each_optimizer_and_counts_its_collectives():
  found = recipe.collectives()
  assert set(found) == {"adamw", "moving_average(adamw)", "hand-written EMA"}
  for counts in found.values():
    # The gradient of a batch sharded over "data" is reduced across it.
    assert counts.get("all-reduce", 0) + counts.get("reduce-scatter", 0) >= 1
