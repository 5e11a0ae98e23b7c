"""The sweep expander: one command per grid point, overrides and workdirs named after them."""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "sweep", pathlib.Path(__file__).parent.parent / "launch" / "sweep.py"
)
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def test_grid_expands_to_every_combination():
    cmds = sweep.commands("configs/c.py:local", "/w", ["optim.lr=1e-3,2e-3", "seed=0,1,2"])
    assert len(cmds) == 6
    assert cmds[0] == (
        "python -m clipjax.main --config=configs/c.py:local --workdir=/w/lr1e-3_seed0 "
        "--config.optim.lr=1e-3 --config.seed=0"
    )
    assert len({c.split("--workdir=")[1].split()[0] for c in cmds}) == 6


def test_no_axes_gives_the_base_run():
    assert sweep.commands("configs/c.py", "/w", []) == [
        "python -m clipjax.main --config=configs/c.py --workdir=/w/base"
    ]
