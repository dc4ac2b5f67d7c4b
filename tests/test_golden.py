"""The configuration grid of ``tests/golden/grid.py`` replays as 0.1.0 ran it.

The golden file was written by optax_ema 0.1.0; every stored average, count
and averaged parameter of every step must come out the same today.
"""

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).with_name("golden")))
import grid

GOLDEN = dict(np.load(grid.GOLDEN))


@pytest.mark.parametrize("name", list(grid.CONFIGS))
def test_configuration_replays_the_golden_file(name):
  got = grid.replay(name)
  want = {k: v for k, v in GOLDEN.items() if k.startswith(f"{name}/")}
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    assert got[key].dtype == value.dtype, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)
