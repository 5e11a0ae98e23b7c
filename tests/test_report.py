"""The report reads metrics.jsonl as the trainer writes it (resumed, truncated) and tabulates
final and best values that match the rows; its figures are real images."""

import json
import math

import numpy as np
import pytest
from absl.testing import flagsaver
from PIL import Image

from clipjax import report

TRAIN_STEPS = [10, 20, 30, 40, 50, 60]
EVAL_STEPS = [20, 40, 60]


def _rows() -> list[dict]:
    """Train rows every 10 steps, eval rows every 20, and a resume that redid steps 50-60."""
    rng = np.random.default_rng(0)
    rows = []
    for step in TRAIN_STEPS:
        terms = {"train/loss_mvs": 3 / step, "train/loss_iss": 2 / step, "train/loss_nns": 1 / step}
        rows.append(
            {
                "step": step,
                "train/loss": sum(terms.values()),
                **terms,
                "train/lr": 1e-3 * step / 60,
                "train/grad_norm": float(rng.uniform(1, 2)),
                "train/logit_scale": 14.3 + step / 10,
                "train/samples_per_s": float(rng.uniform(900, 1100)),
                "data/skipped": step % 20 // 10,
            }
        )
        if step in EVAL_STEPS:
            rows.append(
                {
                    "step": step,
                    "eval/shapes/zeroshot_top1": float(rng.uniform()),
                    "eval/shapes/zeroshot_top5": float(rng.uniform()),
                    "eval/shapes_retrieval/i2t_r1": float(rng.uniform()),
                    "eval/shapes_probe/probe_top1": float(rng.uniform()),
                    "eval/shapes_probe/probe_l2": 1e-4,
                }
            )
    # The run was killed after step 60 and resumed from step 40's checkpoint: steps 50 and 60
    # come again with new values, which replace the old ones (an eval of 0.99 that never counts).
    stale = [r for r in rows if r["step"] > 40]
    rows += [{**r, **{k: v * 0.5 for k, v in r.items() if k != "step"}} for r in stale]
    rows[-1] = {**rows[-1], "eval/shapes/zeroshot_top1": 0.25}
    rows[len(rows) - len(stale) - 1]["eval/shapes/zeroshot_top1"] = 0.99
    return rows


def _write(workdir, rows, tail='{"step": 70, "train/lo'):
    with open(workdir / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
        f.write(tail)  # a line cut off by a kill


def _expected(rows):
    """name → {step: latest value}, then (final step, final value) and best (step, value)."""
    latest = {}
    for row in rows:
        for name, value in row.items():
            if name != "step":
                latest.setdefault(name, {})[row["step"]] = value
    final = {n: max(v.items()) for n, v in latest.items()}
    best = {n: min(v.items(), key=lambda p: (-p[1], p[0])) for n, v in latest.items()}
    return latest, final, best


def _table(text, prefix):
    return {
        cells[0]: cells[1:]
        for line in text.splitlines()
        if line.startswith(f"| {prefix}")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }


def _run_main(capsys, **flag_values):
    with flagsaver.flagsaver(**{"output": None, **flag_values}):
        report.main(["report"])
    return capsys.readouterr().out


def _check_png(path, min_size):
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_size[0] and image.height >= min_size[1]
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # lines and text, not blank


def test_report_tables_match_rows_and_figures_are_images(tmp_path, capsys):
    rows = _rows()
    _write(tmp_path, rows)
    out = _run_main(capsys, workdir=str(tmp_path))

    output = tmp_path / "report"
    paths = [output / name for name in ["training.png", "evals.png", "summary.md"]]
    assert out.splitlines()[-3:] == [str(p) for p in paths]
    assert "skipped 1 malformed line" in out
    _check_png(paths[0], (1000, 700))  # 2 x 2 panels
    _check_png(paths[1], (1200, 300))  # 3 evaluations in a row

    text = paths[2].read_text()
    latest, final, best = _expected(rows)
    assert "- last step: 60" in text
    speeds = [v for _, v in sorted(latest["train/samples_per_s"].items())]
    assert f"- samples/s: {np.median(speeds):,.0f} (median of 6 log rows)" in text
    assert f"- bad records skipped by the input: {sum(latest['data/skipped'].values()):.0f}" in text
    assert "- malformed metrics.jsonl lines skipped: 1" in text

    evals = _table(text, "eval/")
    assert sorted(evals) == sorted(n for n in latest if n.startswith("eval/"))
    for name, (value, step, best_value, best_step) in evals.items():
        assert (int(step), float(value)) == pytest.approx(final[name], rel=1e-5)
        if name.endswith("probe_l2"):
            assert (best_value, best_step) == ("—", "—")
        else:
            assert (int(best_step), float(best_value)) == pytest.approx(best[name], rel=1e-5)
    assert float(evals["eval/shapes/zeroshot_top1"][0]) == 0.25  # the resumed run's value
    assert float(evals["eval/shapes/zeroshot_top1"][2]) < 0.99  # the replaced value never counts

    train = _table(text, "train/")
    losses = [n for n in latest if n.startswith("train/loss")]
    assert sorted(train) == sorted(losses + ["train/logit_scale"])
    for name, (value, step) in train.items():
        assert (int(step), float(value)) == pytest.approx(final[name], rel=1e-5)


def test_no_evals_yet_writes_no_evals_figure(tmp_path, capsys):
    rows = [r for r in _rows() if not any(k.startswith("eval/") for k in r)]
    _write(tmp_path, rows, tail="")
    output = tmp_path / "out"
    out = _run_main(capsys, workdir=str(tmp_path), output=str(output))
    assert "no evaluation rows yet: evals.png not written" in out
    assert sorted(p.name for p in output.iterdir()) == ["summary.md", "training.png"]
    assert "No evaluation rows yet." in (output / "summary.md").read_text()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "metrics.jsonl does not exist; pass the --workdir of a training run."),
        ('{"step": 1, "train/lo', "metrics.jsonl has no complete metrics rows yet"),
    ],
)
def test_missing_or_empty_metrics_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        _run_main(capsys, workdir=str(tmp_path))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("clipjax.report: ")
    assert message in err
    assert not (tmp_path / "report").exists()


def test_best_ignores_nan_and_prefers_earliest_step():
    assert report.best([(10, 0.5), (20, math.nan), (30, 0.7), (40, 0.7)]) == (30, 0.7)
