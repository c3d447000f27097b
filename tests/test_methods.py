"""Methods are one interface, one file each (lofit_ray.methods): the registry, the config's method list and the
cell plan agree, and a new method is one subclass away."""
from __future__ import annotations

import contextlib
from pathlib import Path

from lofit_ray.config import REPRODUCE_METHODS, ReproduceConfig
from lofit_ray.experiments.cells import PER_K, PHASE2, SELECTOR_OF, plan_cells
from lofit_ray.methods import METHODS, HeadMethod, Method

METHOD_DIR = Path(__file__).resolve().parents[1] / "lofit_ray" / "methods"


def test_every_configurable_method_is_one_file_with_one_object():
    assert tuple(METHODS) == REPRODUCE_METHODS
    files = {p.stem for p in METHOD_DIR.glob("*.py")} - {"__init__", "base", "setting"}  # setting: the search hash
    assert files == set(METHODS)
    for name, method in METHODS.items():
        assert isinstance(method, Method) and method.name == name
        assert type(method).__module__ == f"lofit_ray.methods.{name}"


def test_the_cell_plan_follows_what_each_method_declares():
    assert PER_K == ("iti", "random_heads", "transfer_heads", "lofit", "gates_heads", "grad_heads", "grad_x_act_heads")
    assert set(PHASE2) == {n for n, m in METHODS.items() if isinstance(m, HeadMethod)}
    assert SELECTOR_OF == {"random_heads": "random", "lofit": "l1", "gates_heads": "gates", "grad_heads": "grad",
                           "grad_x_act_heads": "grad_x_act"}
    cfg = ReproduceConfig(models=["tiny-llama"], methods=["zero_shot", "lofit", "lora"], seeds=[0, 1],
                          k_fractions=[0.1])
    cells = plan_cells(cfg, "tiny-llama", [2])
    per_task = [(c["method"], c["k"], c["seed"]) for c in cells if c["task"] == "truthfulqa"]
    assert per_task == [("zero_shot", None, None), ("lofit", 2, 0), ("lora", None, 0), ("lofit", 2, 1),
                        ("lora", None, 1)]


def test_a_new_method_is_one_subclass():
    class Nothing(Method):
        name = "nothing"

        @contextlib.contextmanager
        def trained(self, runner, task, k, seed, params, on_epoch=None):
            yield {"trainable_params": 0}

    with Nothing().trained(None, "t", None, 0, {}) as info:
        assert info == {"trainable_params": 0}
    assert Nothing().space == "nothing" and Nothing().setting_part(None, "t") == {}
