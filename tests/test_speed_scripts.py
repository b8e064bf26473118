"""scripts/compile_step_times.py and scripts/train_rate_ab.py: the parts that run without compiling or timing."""
import pytest

from test_ae_recipe import load_script


def test_compile_step_times_cell_trains_the_eager_dit():
    cell = load_script("compile_step_times").one_cell("dit", "eager", steps=12)
    assert set(cell) == {"first_s", "ms", "loss"}
    assert cell["ms"] > 0 and cell["first_s"] > 0 and 0 < cell["loss"] < 2  # an eps-prediction MSE near 1 at first


def test_train_rate_ab_refuses_a_long_run_no_longer_than_the_short_one():
    with pytest.raises(SystemExit, match="must exceed"):
        load_script("train_rate_ab").main(["--trees", ".", "--short", "100", "--long", "100"])
