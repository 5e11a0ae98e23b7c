"""The study's plan, commands, equal-time steps and tables, on hand-made results."""

import statistics

import pytest
from PIL import Image

from clipjax import study
from clipjax.config import unknown_field_error


def test_plan_steps_cover_the_epochs():
    runs = study.plan(["shapes:2000", "glyphs:500"], ["clip", "declip"], ["0", "1"], 30)
    assert len(runs) == 8
    assert {r.steps for r in runs if r.dataset == "shapes:2000"} == {469}  # ceil(30·2000/128)
    assert {r.steps for r in runs if r.dataset == "glyphs:500"} == {118}
    assert runs[0].name == "shapes_2000/clip/s0"


def test_command_overrides_are_config_fields():
    run = study.Run("glyphs:2000", "declip", 1, 469, "steps")
    config, overrides = study.parse_methods(["no_iss"], ["no_iss=declip:declip.iss_weight=0"])[
        "no_iss"
    ]
    argv = study.command(run, config, overrides, "/tmp/w", 2048)
    assert argv[1:5] == [
        "-m",
        "clipjax.main",
        "--config=configs/declip_vitb32.py:local",
        "--workdir=/tmp/w",
    ]
    settings = dict(arg.removeprefix("--").split("=", 1) for arg in argv[5:])
    assert settings["config.data.train"] == "glyphs:2000"
    assert settings["config.evals.shapes.source"] == "glyphs"
    assert settings["config.evals.shapes_probe.train_source"] == "glyphs:2048?seed=1"
    assert settings["config.total_steps"] == settings["config.eval_every"] == "469"
    assert settings["config.seed"] == "1" and settings["config.declip.iss_weight"] == "0"
    assert settings["config.data.augment.flip"] == "False"  # every method's, on glyphs
    for name in settings:
        assert unknown_field_error(name) is None, name
    shapes_run = study.Run("shapes:2000", "clip", 0, 469, "steps")
    argv = study.command(shapes_run, *study.METHODS["clip"], "/tmp/w", 2048)
    assert not [arg for arg in argv if "flip" in arg]


def test_flag_errors():
    with pytest.raises(study.StudyError) as e:
        study.parse_methods(["clip", "moco"], [])
    assert str(e.value) == (
        "--methods: unknown 'moco'; use clip, declip, cliplite, siglip, slip, filip, defilip or "
        "define it with --variant."
    )
    with pytest.raises(study.StudyError, match="is not NAME=BASE:field=value"):
        study.parse_methods(["x"], ["x=simclr:lr=1"])
    with pytest.raises(study.StudyError) as e:
        study.dataset_size("csv:/data/train.csv")
    assert str(e.value) == (
        "--datasets: 'csv:/data/train.csv' is not one of shapes:N, glyphs:N; the study needs a "
        "built-in dataset with a held-out labelled split."
    )


def _row(method, seed, top1, train_s, steps=100, budget="steps", dataset="shapes:2000"):
    metrics = {name: top1 for name in study.METRICS}
    return {"dataset": dataset, "method": method, "seed": seed, "steps": steps,
            "budget": budget, "train_s": train_s, **metrics}  # fmt: skip


def test_wallclock_steps_follow_the_median_time_ratio():
    results = [_row("declip", s, 0.3, t) for s, t in ((0, 200), (1, 210), (2, 190))]
    results += [_row("clip", s, 0.2, t) for s, t in ((0, 80), (1, 100), (2, 90))]
    runs = study.wallclock_plan(results, "declip")
    assert [(r.method, r.seed, r.budget) for r in runs] == [
        ("clip", s, "wallclock") for s in (0, 1, 2)
    ]
    assert {r.steps for r in runs} == {223}  # ceil(100 · 200 / 90)
    assert runs[0].name == "shapes_2000/clip_wallclock/s0"


def test_table_and_figure_from_results(tmp_path):
    results = [_row("clip", s, v, 90) for s, v in ((0, 0.25), (1, 0.30), (2, 0.26))]
    results.append(_row("clip", 0, 0.4, 90, dataset="shapes:10000"))
    text = study.table(results)
    lines = text.splitlines()
    assert lines[0].startswith("| dataset | method | budget | steps | train s | zero-shot top-1")
    values = [0.25, 0.30, 0.26]
    mean, sd = 100 * statistics.mean(values), 100 * statistics.stdev(values)
    row = next(line for line in lines if line.startswith("| shapes:2000 | clip"))
    assert f"**{mean:.1f}** ± {sd:.1f}" in row and row.endswith("| 25.0, 30.0, 26.0 |")
    assert "| — | — |" in row  # CLIP is not compared with itself
    # DeCLIP on seeds 0 and 2 only: paired with CLIP's seeds 0 and 2.
    results += [_row("declip", 0, 0.31, 200), _row("declip", 2, 0.27, 200)]
    row = next(line for line in study.table(results).splitlines() if "| declip |" in line)
    diffs = [0.31 - 0.25, 0.27 - 0.26]
    paired = f"+{100 * statistics.mean(diffs):.1f} ± {100 * statistics.stdev(diffs):.1f}"
    assert row.endswith(f"| {paired} | {paired} | 31.0, 27.0 |"), row
    path = tmp_path / "study.png"
    study.figure(results, str(path))
    assert Image.open(path).size[0] > 100
