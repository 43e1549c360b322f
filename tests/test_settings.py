"""`pgpo config`: the resolved configuration round-trips, `--keys` covers every setting with its
meaning, and docs/trainer.md's settings reference is the schema's own output."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from pgpo.cli import main as pgpo_main
from pgpo.train.config import TrainConfig, load_config
from pgpo.train.settings import keys, keys_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_the_printed_yaml_is_the_run_that_train_would_start(tmp_path, capsys):
    assert pgpo_main(["config", "tiny-cpu", "pgpo.alpha=1.5", "loss.topk=null"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    again = load_config(tmp_path / "printed.yaml")
    assert again == load_config("tiny-cpu", ["pgpo.alpha=1.5", "loss.topk=null"])
    assert again.pgpo.alpha == 1.5 and again.loss.topk is None
    assert again != load_config("tiny-cpu")  # the override is in it


def test_config_refuses_what_train_refuses_in_one_line(capsys):
    for argv in (["config", "tiny-cpu", "pgpo.alpha=500"], ["config", "tiny-cpu", "no.such=1"],
                 ["config"], ["config", "tiny-cpu", "--keys"]):  # fmt: skip
        assert pgpo_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("pgpo: error:") and "\n" not in err, err


def _leaf_names(cls, prefix: str = "") -> list[str]:
    """Every leaf field of a config dataclass, walked here independently of pgpo.train.settings."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaf_names(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def test_keys_cover_every_field_with_its_type_default_and_meaning(capsys):
    rows = keys()
    assert [k.name for k in rows] == _leaf_names(TrainConfig)
    assert all(k.description for k in rows), [k.name for k in rows if not k.description]
    defaults = TrainConfig()
    for k in rows:  # the default shown is the dataclass's
        value = defaults
        for part in k.name.split("."):
            value = getattr(value, part)
        assert k.default == value, k.name
    by_name = {k.name: k for k in rows}
    assert by_name["pgpo.alpha"].type == "a finite number in (0, 100]"
    assert by_name["teacher.mode"].type == "one of ema, live, frozen, trust_region"
    assert "rollouts per question" in by_name["rollout.n"].description  # the field's comment
    assert pgpo_main(["config", "--keys"]) == 0
    printed = capsys.readouterr().out
    assert all(f"\n{k.name}: " in f"\n{printed}" for k in rows)


def test_the_docs_settings_reference_is_the_schema():
    page = (ROOT / "docs" / "trainer.md").read_text()
    block = page.split("<!-- settings: begin -->\n")[1].split("<!-- settings: end -->")[0]
    assert block == keys_markdown(keys()), "regenerate: pgpo config --keys --markdown"
