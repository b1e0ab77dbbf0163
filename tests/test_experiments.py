"""The λ sweep script (experiments/sweep.py): its grid becomes valid params, and matched-sparsity interpolation."""
import importlib.util
import math

import pytest
from conftest import ROOT

from lexvla.params import params_from_dict

spec = importlib.util.spec_from_file_location("sweep", ROOT / "experiments" / "sweep.py")
sweep = importlib.util.module_from_spec(spec); spec.loader.exec_module(sweep)


def test_grid_is_valid_params_on_the_val_split():
    d = sweep.sweep_params(ROOT / "params.yaml", steps=7)
    p = params_from_dict(d, source="sweep")
    assert p.evaluate.split == "val" and p.train.steps == 7
    assert {v.reg for v in p.train.variants.values()} == {"overuse", "flops", "none"}
    assert p.train.variants["flops-0.0001"].lam == pytest.approx(1e-4)


def test_matched_sparsity_interpolates_in_log_active_words():
    rows = [{"reg": "none", "image_active_words": 4000.0, "mean_R@1": 0.10},
            {"reg": "overuse", "image_active_words": 1000.0, "mean_R@1": 0.20},
            {"reg": "flops", "image_active_words": 500.0, "mean_R@1": 0.05}]
    m = sweep.at_matched(rows, "mean_R@1", [2000.0, 800.0])
    assert m["overuse"][0] == pytest.approx(0.15)  # half-way between 1000 and 4000 in log
    assert m["overuse"][1] is None                  # below overuse's sparsest run: not extrapolated
    assert m["flops"][0] == pytest.approx(0.05 + 0.05 * math.log(4) / math.log(8))
