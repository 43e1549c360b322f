"""SciKnowEval by domain in the SDPO reference's folder layout, and Hugging Face ``datasets``
input with the same field mapping."""

import json

import pytest

from pgpo.cli import main as pgpo_main
from pgpo.train.config import ConfigError, load_config
from pgpo.train.tasks.data import DOMAINS, DataError, load_jsonl, load_split, split_specs

SIZES = {"biology": (5, 2), "chemistry": (7, 3), "material": (4, 2), "physics": (6, 2)}


def _row(domain: str, split: str, i: int) -> dict:
    """A row with the reference's fields (idx, kind, dataset, answer, elo, prompt, ...)."""
    options = "A: one\nB: two\nC: three\nD: four" if i % 2 else "A: yes\nB: no"
    return {
        "idx": f"{domain}-{split}-{i}",
        "kind": "mcq",
        "dataset": "sciknoweval",
        "answer": "AB"[i % 2],
        "elo": 1200 + i,
        "prompt": f"{domain} question {i}?\n\n{options}\n\nPlease reason step by step.",
        "description": "",
        "tests": "-",
        "embedding": [],
        "system": "Answer inside <answer>...</answer>.",
    }


@pytest.fixture
def reference(tmp_path):
    """The reference's repository layout: datasets/sciknoweval/<domain>/{train,test}.json."""
    root = tmp_path / "SDPO"
    for domain, sizes in SIZES.items():
        folder = root / "datasets" / "sciknoweval" / domain
        folder.mkdir(parents=True)
        for split, n in zip(("train", "test"), sizes):
            lines = [json.dumps(_row(domain, split, i)) for i in range(n)]
            (folder / f"{split}.json").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("level", ["", "datasets", "datasets/sciknoweval"])
def test_every_domain_loads_by_name_from_any_level_of_the_layout(reference, level):
    for domain in DOMAINS:
        folder = reference / level
        overrides = ["data.train=", "data.test=", f"data.sciknoweval={folder}"]
        cfg = load_config("tiny-cpu", [*overrides, f"data.domain={domain}"])
        d = cfg.data
        train, test = split_specs(d.train, d.test, d.sciknoweval, d.domain)
        for spec, split, n in zip((train, test), ("train", "test"), SIZES[domain]):
            data = load_split(spec, split, 0, False, None)
            assert [q.id for q in data.questions] == [f"{domain}-{split}-{i}" for i in range(n)]
            assert data.questions[1].answer == "B" and data.questions[1].system.startswith("Answer")


def test_missing_folders_files_and_domains_get_one_line(reference, tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        split_specs("", "", str(tmp_path / "nowhere"), "physics")
    (reference / "datasets" / "sciknoweval" / "physics" / "test.json").unlink()
    with pytest.raises(DataError, match="test.json is missing"):
        split_specs("", "", str(reference), "physics")
    with pytest.raises(DataError, match="no biology/ folder"):
        split_specs("", "", str(tmp_path), "biology")
    with pytest.raises(ConfigError, match="data.domain"):
        load_config(
            "tiny-cpu",
            ["data.train=", "data.test=", f"data.sciknoweval={reference}", "data.domain=bio"],
        )
    with pytest.raises(ConfigError, match="data.train"):  # both ways of naming the data
        load_config("tiny-cpu", [f"data.sciknoweval={reference}", "data.domain=physics"])
    with pytest.raises(ConfigError, match="data.sciknoweval"):  # the 8B presets name a domain
        load_config("qwen3-8b-pgpo", [])


def test_the_cli_refuses_a_missing_sciknoweval_folder_in_one_line(tmp_path, capsys):
    args = ["train", "--config", "tiny-cpu", "data.train=", "data.test=",
            f"output.dir={tmp_path / 'run'}", f"data.sciknoweval={tmp_path / 'no-SDPO'}",
            "data.domain=physics"]  # fmt: skip
    assert pgpo_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "data.sciknoweval" in err and "no-SDPO" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_a_json_array_file_reads_like_json_lines(tmp_path):
    rows = [_row("physics", "train", i) for i in range(3)]
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "array.json").write_text(json.dumps(rows, indent=2))
    lines, array = load_jsonl(tmp_path / "lines.json"), load_jsonl(tmp_path / "array.json")
    assert [q.id for q in lines.questions] == [q.id for q in array.questions] == [
        "physics-train-0", "physics-train-1", "physics-train-2"
    ]  # fmt: skip


def test_hugging_face_datasets_input_maps_the_same_fields(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    train = [_row("chemistry", "train", i) for i in range(4)]
    test = [_row("chemistry", "test", i) for i in range(2)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in train))
    plain = load_split(str(tmp_path / "train.jsonl"), "train", 0, False, None).questions
    datasets.Dataset.from_list(train).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}
    ).save_to_disk(str(tmp_path / "saved_dict"))
    for spec in (f"hf:{tmp_path / 'saved'}", f"hf:{tmp_path / 'saved_dict'}",
                 f"hf:json:{tmp_path / 'train.jsonl'}"):  # fmt: skip
        assert load_split(spec, "train", 0, False, None).questions == plain, spec
    got = load_split(f"hf:{tmp_path / 'saved_dict'}", "test", 0, False, None).questions
    assert [q.id for q in got] == ["chemistry-test-0", "chemistry-test-1"]
    with pytest.raises(DataError, match="no split 'validation'"):
        load_split(f"hf:{tmp_path / 'saved_dict'}", "validation", 0, False, None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="hub cannot be reached"):
        load_split("hf:someone/sciknoweval", "train", 0, False, None)
