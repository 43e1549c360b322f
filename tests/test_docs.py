"""Every command the README and docs/ show is accepted as written: its arguments parse with the
command's own parser, and a training config (preset plus key=value overrides) passes the same
validation that `pgpo train` runs before loading a model. Running them all would take hours (the
demo alone is 5 minutes); what they do is tested elsewhere."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pgpo.cli import build_parser as pgpo_parser
from pgpo.train.config import PRESETS, load_config
from pgpo.train.gpu.check import build_parser as check_gpu_parser
from pgpo.train.gpu.smoke import build_parser as smoke_parser
from proofs_checks.cli import build_parser as check_parser
from sde.cli import build_parser as sde_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = ("pgpo ", "pgpo-sde ", "pgpo-check ", "torchrun ", "python -m pgpo.")


def doc_commands() -> list[tuple[str, str]]:
    """(page:line, command) for each command line in a code block (fenced or indented)."""
    found = []
    for page in PAGES:
        fenced = False
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if line.startswith("```"):
                fenced = not fenced
                continue
            if not (fenced or line.startswith("    ")):
                continue
            for part in line.strip().split("&&"):  # `... && pgpo demo` in an install line
                text = re.sub(r"\s+#\s.*$", "", part.strip())  # a trailing comment
                if text.startswith(PROGRAMS):
                    found.append((f"{page.name}:{number}", text))
    return found


COMMANDS = doc_commands()


def test_the_docs_show_commands_of_every_program():
    programs = {cmd.split()[0] for _, cmd in COMMANDS}
    assert {"pgpo", "pgpo-sde", "pgpo-check", "torchrun", "python"} <= programs
    assert len(COMMANDS) > 25


def _written_configs() -> dict[str, str]:
    """{run folder: preset} for every documented command that names both (output.dir=...)."""
    found = {}
    for _, command in COMMANDS:
        argv = shlex.split(command)
        if "--config" in argv:
            folder = [a.split("=", 1)[1] for a in argv if a.startswith("output.dir=")]
            if folder:
                found[folder[-1]] = argv[argv.index("--config") + 1]
    return found


def _check_train_config(args) -> None:
    """A preset's or an existing file's config with the overrides, as `pgpo train` checks it.
    A config file that a previous command writes (runs/...) is checked as the preset it
    came from: the one named with that output.dir, else the folder's name."""
    config = args.config
    if not (PRESETS / f"{config}.yaml").exists() and not Path(config).exists():
        folder = str(Path(config).parent)
        # runs/mine/config.yaml -> the preset of output.dir=runs/mine; runs/tiny-cpu -> tiny-cpu
        config = _written_configs().get(folder, Path(folder).name)
    load_config(config, args.overrides)


@pytest.mark.parametrize("where,command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_is_accepted(where, command):
    argv = shlex.split(command)
    if argv[0] == "torchrun":  # torchrun ... -m pgpo.train ARGS == pgpo train ARGS
        module = argv.index("-m")
        assert argv[module + 1] in ("pgpo.train", "pgpo.cli"), where
        rest = argv[module + 2 :]
        argv = ["pgpo", *(["train"] if argv[module + 1] == "pgpo.train" else []), *rest]
    if argv[:3] == ["python", "-m", "pgpo.train"]:
        argv = ["pgpo", "train", *argv[3:]]
    if argv[:3] == ["python", "-m", "pgpo.train.gpu.smoke"]:
        smoke_parser().parse_args(argv[3:])
        return
    if argv[:3] == ["python", "-m", "pgpo.train.gpu.check"]:
        check_gpu_parser().parse_args(argv[3:])
        return
    parser = {"pgpo": pgpo_parser, "pgpo-sde": sde_parser, "pgpo-check": check_parser}[argv[0]]
    args = parser().parse_args(argv[1:])
    if argv[1] in ("train", "eval", "teacher-check"):
        _check_train_config(args)
    elif argv[1] == "sweep":
        from pgpo.train.experiments.sweep import expand

        expand(ROOT / args.grid)  # every run of the shipped grid validates
    elif argv[1] == "demo":
        load_config("demo", args.overrides)


def test_your_model_and_data_page_runs_as_written(tmp_path, monkeypatch, capsys):
    """docs/your-model-and-data.md's CPU cycle, its four commands as the page writes them, on a
    20-row file of one's own: train, resume to more steps, evaluate, export."""
    import json

    from transformers import AutoModelForCausalLM

    from pgpo.cli import main

    page = (ROOT / "docs" / "your-model-and-data.md").read_text()
    block = page.split("## Try it on a CPU")[1].split("```bash\n")[1].split("```")[0]
    commands = [shlex.split(line) for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["pgpo", "train"], ["pgpo", "train"], ["pgpo", "eval"],
                                         ["pgpo", "export"]]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_data").mkdir()
    question = "Which number is largest?\n\nA: {}\nB: {}\nC: {}"
    rows = [{"idx": f"q{i}", "prompt": question.format(i, i + 7, i + 3), "answer": "B"}
            for i in range(20)]  # fmt: skip
    for name, part in (("train", rows[:15]), ("test", rows[15:])):
        text = "".join(json.dumps(r) + "\n" for r in part)
        (tmp_path / "my_data" / f"{name}.jsonl").write_text(text)
    for argv in commands:
        assert main(argv[1:]) == 0, argv
    run = tmp_path / "runs" / "mine"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 6 and {2, 4, 6} <= {p.name for p in (run / "checkpoints").iterdir()} | {
        int(p.name.split("_")[1]) for p in (run / "checkpoints").iterdir()
    }
    scores = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line[:1] == "{"]
    assert len(scores) == 1 and scores[0]["questions"] > 0 and 0 <= scores[0]["avg_at_k"] <= 1
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert model.config.vocab_size == 151_936 and (run / "model" / "README.md").exists()


def test_the_pages_speak_of_the_project_only():
    """README, CONTRIBUTING, docs/, results/ and the code describe the project and its
    measurements, not how the work on it was organised: no word of sessions or issues."""
    pages = [*PAGES, *sorted((ROOT / "results").glob("*/README.md"))]
    # The code's comments and docstrings too (pytest's session scope is pytest's word).
    code = [p for d in ("pgpo", "sde", "proofs_checks", "benchmarks", "tests", "examples")
            for p in sorted((ROOT / d).rglob("*.py")) if p != Path(__file__)]  # fmt: skip
    words = re.compile(r"\b(sessions?|issues?)\b", re.IGNORECASE)
    found = [
        f"{p.name}:{n}: {line.strip()[:80]}"
        for p in [*pages, *code]
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if words.search(line.replace('scope="session"', ""))
    ]
    assert not found, found


def test_every_results_block_matches_its_summary_file():
    """The docs' generated result blocks equal what their committed summaries make
    (`python -m pgpo.demo.results` rewrites them), and every block is on some page."""
    from pgpo.demo import results

    assert results.update(write=False) == []
    text = "".join(p.read_text() for p in results.pages())
    assert all(f"<!-- results: {name} -->" in text for name in results.BLOCKS)


def test_a_results_block_that_drifts_from_its_file_is_found(tmp_path):
    """A number edited by hand in a block, or a summary changed under it, is reported."""
    import shutil

    from pgpo.demo import results

    for pattern, _ in results.BLOCKS.values():
        for file in ROOT.glob(pattern):
            path = file.relative_to(ROOT)
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(file, tmp_path / path)
    (tmp_path / "docs").mkdir()
    page = (ROOT / "docs" / "study.md").read_text()
    (tmp_path / "docs" / "study.md").write_text(
        page.replace("+0.0049 +- 0.0007", "+0.0050 +- 0.0007")
    )
    assert results.update(tmp_path, write=False) == ["docs/study.md:premise-noisy"]
    assert results.update(tmp_path) == ["docs/study.md:premise-noisy"]  # rewritten from the file
    assert results.update(tmp_path, write=False) == []
    assert "+0.0049 +- 0.0007" in (tmp_path / "docs" / "study.md").read_text()


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation other than ``-`` and
    ``_`` dropped, spaces made hyphens (headings inside code blocks are not headings)."""
    anchors, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_every_link_to_a_heading_finds_it():
    """A link ``page.md#anchor`` (or ``#anchor`` within a page) names a heading that exists,
    so renaming a heading cannot silently break the pages that point to it."""
    broken = []
    for page in PAGES:
        for target, anchor in re.findall(r"\]\(([\w./-]*\.md|)#([\w-]+)\)", page.read_text()):
            linked = page if not target else (page.parent / target).resolve()
            if anchor not in heading_anchors(linked):
                broken.append(f"{page.relative_to(ROOT)} -> {target}#{anchor}")
    assert not broken, broken
