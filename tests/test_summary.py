"""The closing summary of a run and of an evaluation: final and best values, chance levels,
the commands that come next."""

import json

from clipjax import summary


def _cells(text: str, key: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.split()[:1] == [key])
    return [cell for cell in line.split("  ") if cell.strip()][1:]


def test_training_summary_has_final_best_and_chance(tmp_path):
    rows = [
        {"step": 10, "train/loss": 2.0, "eval/a/zeroshot_top1": 0.25, "eval/a/probe_l2": 0.01},
        {"step": 20, "train/loss": 1.5, "eval/a/zeroshot_top1": 0.125, "eval/a/probe_l2": 0.1},
    ]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
        f.write('{"step": 30, "train/lo')  # a line cut by a kill is skipped
    text = summary.training(str(tmp_path), {"eval/a/zeroshot_top1": 1 / 48})
    assert text.splitlines()[0] == f"Trained to step 20; the run is in {tmp_path}"
    cells = [c.strip() for c in _cells(text, "eval/a/zeroshot_top1")]
    assert cells == ["0.125 (step 20)", "0.25 (step 10)", "0.02083"]
    assert [c.strip() for c in _cells(text, "eval/a/probe_l2")] == ["0.1 (step 20)", "—", "—"]
    for module in ("report", "evaluate", "export", "predict"):
        assert f"python -m clipjax.{module} " in text


def test_evaluation_summary_names_where_results_went():
    text = summary.evaluation({"eval/a/t2i_r1": 0.5}, {"eval/a/t2i_r1": 0.01}, 6, "/w")
    assert text.splitlines()[0] == "Evaluated step 6 of /w, appended to its metrics.jsonl"
    assert [c.strip() for c in _cells(text, "eval/a/t2i_r1")] == ["0.5", "0.01"]
    text = summary.evaluation({"eval/a/t2i_r1": 0.5}, {}, None, None, "/export")
    assert text.splitlines()[0] == "Evaluated the model /export (printed only)"
