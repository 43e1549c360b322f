"""``pgpo sweep`` over a 2 x 2 grid of tiny runs (two SciKnowEval domains in the reference's
layout x SDPO / PGPO), idempotent, then ``pgpo table``: the tables, the CSV and the figures."""

import csv
import json

import pytest
import yaml

from pgpo.cli import main as pgpo_main
from pgpo.train.config import ConfigError
from pgpo.train.experiments.sweep import expand
from pgpo.train.experiments.table import parse_budget
from tests.test_data_sources import _row


@pytest.fixture
def grid(tmp_path):
    root = tmp_path / "SDPO"
    for domain in ("biology", "physics"):
        folder = root / "datasets" / "sciknoweval" / domain
        folder.mkdir(parents=True)
        for split, n in (("train", 8), ("test", 4)):
            rows = [json.dumps(_row(domain, split, i)) for i in range(n)]
            (folder / f"{split}.json").write_text("\n".join(rows) + "\n")
    spec = {
        "base": "tiny-cpu",
        "out": str(tmp_path / "runs"),
        "overrides": [
            "data.train=",
            "data.test=",
            f"data.sciknoweval={root}",
            "steps=2",
            "eval.every=1",
            "eval.n=1",
            "output.save_every=1",
        ],  # fmt: skip
        "grid": {"domain": ["biology", "physics"], "method": ["sdpo", "pgpo"], "alpha": [1.0]},
        "launch": "torchrun --nproc-per-node 2 -m pgpo.train",
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_a_grid_sweeps_once_and_tabulates(grid, tmp_path, capsys):
    names = ["biology-sdpo", "biology-pgpo-a1", "physics-sdpo", "physics-pgpo-a1"]
    assert pgpo_main(["sweep", str(grid), "--print"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(line.startswith("torchrun --nproc-per-node 2") for line in lines)
    assert "data.domain=physics" in lines[2] and "pgpo.enabled=false" in lines[2]
    assert pgpo_main(["sweep", str(grid)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{n}: trained" for n in names]
    runs = tmp_path / "runs"
    before = {n: (runs / n / "metrics.jsonl").read_text() for n in names}
    assert pgpo_main(["sweep", str(grid)]) == 0  # idempotent: nothing runs again
    assert capsys.readouterr().out.splitlines() == [f"{n}: done" for n in names]
    assert {n: (runs / n / "metrics.jsonl").read_text() for n in names} == before

    out = tmp_path / "table"
    args = ["table", *(str(runs / n) for n in names), "--out", str(out), "--steps", "1"]
    assert pgpo_main(args) == 0
    table = (out / "table.md").read_text()
    for heading in ("### best_1h", "### best_5h", "### best_1_steps", "### final"):
        assert heading in table
    assert "| method | biology | physics |" in table and "| PGPO alpha=1 |" in table
    with open(out / "table.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    for n in names:  # each number is the run's own log, read back
        logged = [json.loads(x) for x in before[n].splitlines()]
        scores = [r["eval_avg_at_k"] for r in logged if "eval_avg_at_k" in r]
        assert float(rows[n]["final"]) == pytest.approx(scores[-1])
        assert float(rows[n]["best_1h"]) == pytest.approx(max(scores))  # tiny runs: seconds
        assert float(rows[n]["best_1_steps"]) == pytest.approx(scores[0])
    for domain in ("biology", "physics"):
        assert (out / f"curves_{domain}.png").stat().st_size > 5_000


def test_a_partial_run_resumes(grid, capsys):
    from pgpo.train.loop import train

    runs, _ = expand(grid)
    assert runs[0].state() == "new"
    runs[0].cfg.steps = 1  # one of its two steps, as a job killed after a checkpoint
    train(runs[0].cfg, progress=False)
    runs, _ = expand(grid)
    assert [r.state() for r in runs] == ["partial", "new", "new", "new"]
    assert pgpo_main(["sweep", str(grid), "--print"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "--resume" in lines[0] and not any("--resume" in line for line in lines[1:])


def test_bad_grids_and_budgets_are_refused(grid, tmp_path):
    spec = yaml.safe_load(grid.read_text())
    spec["grid"]["method"] = ["ppo"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="grid.method"):
        expand(tmp_path / "bad.yaml")
    spec["grid"] = {"domain": ["biology"], "lr": [1]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="grid.lr"):
        expand(tmp_path / "bad.yaml")
    spec["grid"] = {"domain": ["chem"]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="run chem-pgpo: data.domain"):
        expand(tmp_path / "bad.yaml")
    assert parse_budget("1h") == 3600 and parse_budget("90m") == 5400
    with pytest.raises(ConfigError, match="budget"):
        parse_budget("1 hour")
