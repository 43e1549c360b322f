"""The bad-input corpus: every command, given a mistake, ends with exit code 2 and one line on
stderr that names the problem, and leaves the output location and the user's files as they were.

Each case runs the real command in-process (``main(argv)``) in a folder that holds the user's
own files (an earlier run's log, notes, a file where a folder is expected, data files, and
checkpoints), and compares a snapshot of that folder before and after.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from pgpo.cli import main as pgpo_main
from proofs_checks.cli import main as check_main
from sde.cli import main as sde_main

PROGRAMS = {"pgpo": pgpo_main, "pgpo-sde": sde_main, "pgpo-check": check_main}
OPTIONS = "\n\nA: 1\nB: 2\nC: 3\nD: 4\n\nPlease reason step by step."


def row(**fields) -> str:
    return json.dumps({"idx": 0, "prompt": "Which?" + OPTIONS, "answer": "B", **fields})


DATA = {  # data/<name>: bytes
    "bad_letter.jsonl": row(answer="Z"),
    "empty_answer.jsonl": row(answer=""),
    "two_letters.jsonl": row(answer="AB"),
    "beyond_options.jsonl": row(answer="H"),
    "word_answer.jsonl": row(answer="abcd"),
    "number_answer.jsonl": row(answer=2),
    "no_prompt.jsonl": json.dumps({"idx": 0, "answer": "B"}),
    "no_options.jsonl": row(prompt="Which one? Please reason step by step."),
    "not_json.jsonl": "{not json",
    "empty.jsonl": "",
    "garbage.parquet": "PAR1 not really",
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A real checkpoint of a 1-step tiny run, and broken copies of it."""
    from pgpo.train.config import load_config
    from pgpo.train.loop import train

    root = tmp_path_factory.mktemp("ckpts")
    cfg = load_config("tiny-cpu", [f"output.dir={root / 'run'}", "steps=1", "eval.every=100"])
    good = train(cfg, progress=False) / "checkpoints" / "step_000001"
    out = {"good": good}
    raw = (good / "state.pt").read_bytes()
    for name, content in {
        "truncated": raw[: len(raw) // 2],
        "empty": b"",
        "garbage": b"\x00\x01not a checkpoint" * 100,
    }.items():
        (root / name).mkdir()
        (root / name / "state.pt").write_bytes(content)
        out[name] = root / name
    (root / "no_state").mkdir()
    out["no_state"] = root / "no_state"
    (root / "not_pgpo").mkdir()
    torch.save({"weights": torch.zeros(3)}, root / "not_pgpo" / "state.pt")
    out["not_pgpo"] = root / "not_pgpo"
    return out


@pytest.fixture
def user_dir(tmp_path, monkeypatch, checkpoints) -> Path:
    """The user's folder, as the command's working directory."""
    (tmp_path / "runs" / "tiny-cpu").mkdir(parents=True)
    (tmp_path / "runs" / "tiny-cpu" / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "a_file").write_text("not a folder\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "folder.jsonl").mkdir()
    for name, text in DATA.items():
        (tmp_path / "data" / name).write_text(text + ("\n" if text else ""))
    (tmp_path / "data" / "not_utf8.jsonl").write_bytes(b'{"prompt": "\xff\xfe"}\n')
    (tmp_path / "dup.yaml").write_text("steps: 2\nsteps: 3\n")
    (tmp_path / "bad.yaml").write_text("steps: [1,\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "empty_list.yaml").write_text("[]\n")
    (tmp_path / "zero.yaml").write_text("0\n")
    (tmp_path / "info_text.jsonl").write_text('{"info": "abc"}\n')
    (tmp_path / "binary.jsonl").write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe\x00")
    (tmp_path / "latin1.yaml").write_bytes(b"seed: \xe9\n")
    (tmp_path / "log.jsonl").write_text("{nope\n")
    (tmp_path / "eval_only.jsonl").write_text('{"step": 1, "eval_avg_at_k": 0.5}\n')
    held = tmp_path / "held"  # output.dir of an earlier run: refused without --resume
    held.mkdir()
    (held / "metrics.jsonl").write_text('{"step": 1}\n')
    damaged = tmp_path / "damaged" / "checkpoints" / "step_000001"
    damaged.mkdir(parents=True)
    (damaged / "state.pt").write_bytes(b"garbage")
    done = tmp_path / "done"  # a run whose checkpoint is at step 1
    # Hard links, not copies: 126 cases x 150 MB filled CI's disk. `snapshot` still sees a write.
    step_1 = done / "checkpoints" / "step_000001"
    shutil.copytree(checkpoints["good"], step_1, copy_function=os.link)
    (tmp_path / "out_nonempty").mkdir()
    (tmp_path / "out_nonempty" / "keep.txt").write_text("keep\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under root: a hash of small files, size and mtime of big ones."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_dir():
            out[key] = "dir"
        elif p.stat().st_size < 1 << 20:
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[key] = f"{p.stat().st_size}:{p.stat().st_mtime_ns}"
    return out


TRAIN = ["pgpo", "train", "--config", "tiny-cpu", "output.dir=new_run"]
CASES = [
    # --- pgpo train: config keys and values -----------------------------------------------
    (TRAIN + ["rollout.nn=3"], "unknown key rollout.nn"),
    (TRAIN + ["batch_size=5"], "batch_size"),
    (TRAIN + ["optim.lr=0"], "optim.lr"),
    (TRAIN + ["optim.lr=1e30"], "optim.lr"),
    (TRAIN + ["optim.lr=0.5", "optim.weight_decay=3"], "optim.weight_decay"),
    (TRAIN + ["optim.weight_decay=.inf"], "optim.weight_decay"),
    (TRAIN + ["optim.betas=[0.9]"], "optim.betas"),
    (TRAIN + ["optim.betas=[0.9, 1.0]"], "optim.betas[1]"),
    (TRAIN + ["pgpo.alpha=-1"], "pgpo.alpha"),
    (TRAIN + ["pgpo.alpha=1e308"], "pgpo.alpha"),
    (TRAIN + ["pgpo.rho_max=0.5"], "pgpo.rho_max"),
    (TRAIN + ["pgpo.kind=step"], "pgpo.kind"),
    (TRAIN + ["loss.mode=sampled_token"], "loss.beta"),
    (TRAIN + ["teacher.mode=trust"], "teacher.mode"),
    (TRAIN + ["teacher.trust_region_rate=2"], "teacher.trust_region_rate"),
    (TRAIN + ["pgpo.sharpness=0"], "pgpo.sharpness"),
    (TRAIN + ["rollout.max_new_tokens=0"], "rollout.max_new_tokens"),
    (TRAIN + ["rollout.max_prompt_tokens=1"], "rollout.max_prompt_tokens"),
    (TRAIN + ["rollout.n=two"], "rollout.n"),
    (TRAIN + ["rollout.temperature=.inf"], "rollout.temperature"),
    (TRAIN + ["rollout.top_p=0"], "rollout.top_p"),
    (TRAIN + ["rollout.tis_cap=0.5"], "rollout.tis_cap"),
    (TRAIN + ["rollout.engine=sglang"], "rollout.engine"),
    (TRAIN + ["rollout.vllm_tensor_parallel_size=2"], "tensor-parallel rollouts"),
    (TRAIN + ["teacher.mode=oracle"], "teacher.mode"),
    (TRAIN + ["teacher.success_threshold=5"], "teacher.success_threshold"),
    (TRAIN + ["teacher.ema_rate=1.5"], "teacher.ema_rate"),
    (TRAIN + ["loss.beta=2"], "loss.beta"),
    (TRAIN + ["loss.topk=0"], "loss.topk"),
    (TRAIN + ["loss.reduction=mean"], "loss.reduction"),
    (TRAIN + ["data.max_train=-1"], "data.max_train"),
    (TRAIN + ["data.max_train=0"], "data.max_train"),
    (TRAIN + ["data.max_test=0"], "data.max_test"),
    (TRAIN + ["model.tiny_heads=0"], "model.tiny_heads"),
    (TRAIN + ["model.tiny_head_dim=0"], "model.tiny_head_dim"),
    (TRAIN + ["model.dtype=float16"], "model.dtype"),
    (TRAIN + ["eval.top_p=0"], "eval.top_p"),
    (TRAIN + ["fsdp.checkpoint=partial"], "fsdp.checkpoint"),
    (TRAIN + ["seed=-1"], "seed"),
    (TRAIN + ["steps=0"], "steps"),
    (TRAIN + ["steps=["], "steps=["),
    (TRAIN + ["seed=\udcff"], "seed="),
    (TRAIN + ["steps"], "expected key=value"),
    (TRAIN + ["rollout=3"], "rollout"),
    (TRAIN + ["foo.bar=1"], "unknown key foo"),
    (["pgpo", "train", "--config", "tiny-cpu", "output.dir="], "output.dir"),
    (["pgpo", "train", "--config", "missing.yaml"], "missing.yaml not found"),
    (["pgpo", "train", "--config", "data"], "data not found"),
    (["pgpo", "train", "--config", "dup.yaml"], "appears twice"),
    (["pgpo", "train", "--config", "bad.yaml"], "not valid YAML"),
    (["pgpo", "train", "--config", "list.yaml"], "expected a mapping"),
    (["pgpo", "train", "--config", "empty_list.yaml"], "empty_list.yaml: expected a mapping"),
    (["pgpo", "train", "--config", "zero.yaml"], "zero.yaml: expected a mapping"),
    (["pgpo", "train", "--config", "data"], "it is a folder"),
    (["pgpo", "train", "--config", "tiny-cpu", "=5"], "no key before '='"),
    (TRAIN + ["data.train=/dev/null"], "/dev/null is not a regular file"),
    (["pgpo", "train", "--config", "latin1.yaml"], "cannot be read"),
    (["pgpo", "train"], "--config"),
    # --- pgpo train: output folder, resume, model -----------------------------------------
    (TRAIN[:4] + ["output.dir=a_file"], "is not a folder"),
    (TRAIN[:4] + ["output.dir=held"], "holds an earlier run"),
    (TRAIN[:4] + ["output.dir=runs/tiny-cpu"], "holds an earlier run"),
    (TRAIN + ["--resume"], "no usable checkpoint"),
    (TRAIN[:4] + ["output.dir=damaged", "--resume"], "is damaged"),
    (TRAIN[:4] + ["output.dir=done", "steps=1", "--resume"], "nothing to do"),
    (
        TRAIN[:4] + ["output.dir=done", "steps=2", "seed=1", "--resume"],
        "--resume from step 1 cannot change seed 0 -> 1: fixed for a run",
    ),
    (
        TRAIN[:4] + ["output.dir=done", "steps=2", "model.tiny_layers=1", "--resume"],
        "cannot change model.tiny_layers 2 -> 1: fixed",
    ),
    (
        TRAIN[:4] + ["output.dir=done", "steps=2", "data.train=data/mine.jsonl", "--resume"],
        "cannot change data.train 'synthetic' -> 'data/mine.jsonl': fixed",
    ),
    (
        TRAIN[:4] + ["output.dir=done", "steps=2", "batch_size=8", "loss.beta=1", "--resume"],
        "cannot change batch_size 4 -> 8, loss.beta 0.5 -> 1.0: fixed",
    ),
    (
        TRAIN[:4] + ["output.dir=done", "steps=2", "teacher.mode=frozen", "--resume"],
        "cannot change teacher.mode 'ema' -> 'frozen': fixed",
    ),
    (TRAIN + ["model.path=/nonexistent/model"], "does not exist"),
    (TRAIN + ["model.path=no-such-org/no-such-model"], "cannot be reached"),
    (TRAIN + ["model.tokenizer=no-such-org/no-such-model"], "cannot be reached"),
    # --- pgpo train: data files and rows --------------------------------------------------
    (TRAIN + ["data.train=data/missing.jsonl"], "does not exist"),
    (TRAIN + ["data.train=data/folder.jsonl"], "is a folder"),
    (TRAIN + ["data.train=data/bad_letter.jsonl"], "not one of the options ABCD"),
    (TRAIN + ["data.train=data/empty_answer.jsonl"], "one option letter"),
    (TRAIN + ["data.train=data/two_letters.jsonl"], "one option letter"),
    (TRAIN + ["data.train=data/beyond_options.jsonl"], "not one of the options ABCD"),
    (TRAIN + ["data.train=data/word_answer.jsonl"], "one option letter"),
    (TRAIN + ["data.train=data/number_answer.jsonl"], "one option letter"),
    (TRAIN + ["data.train=data/no_prompt.jsonl"], "'prompt'"),
    (TRAIN + ["data.train=data/no_options.jsonl"], "lists no options"),
    (TRAIN + ["data.train=data/not_json.jsonl"], "not JSON"),
    (TRAIN + ["data.train=data/empty.jsonl"], "no usable questions"),
    (TRAIN + ["data.train=data/not_utf8.jsonl"], "not UTF-8"),
    (TRAIN + ["data.train=data/garbage.parquet"], "not a readable parquet file"),
    (TRAIN + ["data.train="], "data.train is empty"),
    # --- pgpo eval / export / consolidate: checkpoints --------------------------------------
    (["pgpo", "eval", "--config", "tiny-cpu", "--checkpoint", "{no_state}"], "no state.pt"),
    (["pgpo", "eval", "--config", "tiny-cpu", "--checkpoint", "{truncated}"], "damaged"),
    (["pgpo", "eval", "--config", "tiny-cpu", "--checkpoint", "{empty}"], "damaged"),
    (["pgpo", "eval", "--config", "tiny-cpu", "--checkpoint", "{garbage}"], "state.pt"),
    (["pgpo", "eval", "--config", "tiny-cpu", "--checkpoint", "{not_pgpo}"], "not a pgpo"),
    (
        [
            "pgpo",
            "eval",
            "--config",
            "tiny-cpu",
            "model.tiny_hidden_size=32",
            "--checkpoint",
            "{good}",
        ],
        "does not fit",
    ),  # fmt: skip
    (["pgpo", "eval", "--config", "tiny-cpu"], "--checkpoint"),
    (["pgpo", "export", "--checkpoint", "{truncated}", "--out", "model"], "damaged"),
    (["pgpo", "export", "--checkpoint", "{garbage}", "--out", "model"], "state.pt"),
    (["pgpo", "export", "--checkpoint", "{no_state}", "--out", "model"], "no state.pt"),
    (["pgpo", "export", "--checkpoint", "{not_pgpo}", "--out", "model"], "not a pgpo"),
    (["pgpo", "export", "--checkpoint", "{good}", "--out", "out_nonempty"], "not empty"),
    (["pgpo", "export", "--checkpoint", "{good}", "--out", "a_file"], "not empty"),
    (["pgpo", "export", "--checkpoint", "{good}", "--out", "m", "--dtype", "f16"], "--dtype"),
    (["pgpo", "consolidate", "--checkpoint", "{good}", "--out", "whole"], "not a sharded"),
    (["pgpo", "consolidate", "--checkpoint", "{garbage}", "--out", "whole"], "state.pt"),
    (["pgpo", "consolidate", "--checkpoint", "{good}", "--out", "a_file"], "not a folder"),
    # --- pgpo multiplier / demo -----------------------------------------------------------
    (["pgpo", "multiplier", "--alpha", "0"], "--alpha"),
    (["pgpo", "multiplier", "--alpha", "nan"], "--alpha"),
    (["pgpo", "multiplier", "--rho-max", "0.5"], "rho_max"),
    (["pgpo", "multiplier", "--alpha", "1e308", "--out", "m"], "alpha must be in (0, 100]"),
    (["pgpo", "multiplier", "--rho-max", "1e9"], "rho_max must be in [1, 100]"),
    (["pgpo", "multiplier", "--rho-max", "inf"], "rho_max"),
    (["pgpo", "multiplier", "--sharpness", "-1"], "--sharpness"),
    (["pgpo", "multiplier", "--out", "a_file"], "not a folder"),
    (["pgpo", "multiplier", "--out", "/proc/pgpo-out"], "/proc"),
    (["pgpo", "demo", "--seeds", "0"], "--seeds"),
    (["pgpo", "demo", "--collapse", "--real"], "not allowed with"),
    (["pgpo", "demo", "optim.lr=abc"], "optim.lr"),
    (["pgpo", "demo", "--steps", "-3"], "--steps"),
    (["pgpo", "nonsense"], "invalid choice"),
    # --- pgpo-sde ---------------------------------------------------------------------------
    (["pgpo-sde", "weak-error", "--paths", "1"], "--paths"),
    (["pgpo-sde", "weak-error", "--etas", "0,0.1"], "--etas"),
    (["pgpo-sde", "weak-error", "--etas", "abc"], "--etas"),
    (["pgpo-sde", "weak-error", "--etas", "2"], "--horizon"),
    (["pgpo-sde", "weak-error", "--etas", "1e-300"], "steps per path"),
    (["pgpo-sde", "weak-error", "--models", "foo"], "foo"),
    (["pgpo-sde", "weak-error", "--problem", "cubic"], "--problem"),
    (["pgpo-sde", "weak-error", "--batch-size", "1000", "--without-replacement"], "exceeds"),
    (["pgpo-sde", "weak-error", "--out", "a_file", "--paths", "10"], "not a folder"),
    (["pgpo-sde", "weak-error", "--optimizer", "adamw", "--models", "paper"], "--models"),
    (
        ["pgpo-sde", "weak-error", "--optimizer", "adamw", "--info-source", "independent-batch"],
        "--info-source",
    ),  # fmt: skip
    (["pgpo-sde", "weak-error", "--optimizer", "adamw", "--betas", "0.9,0.99"], "--betas"),
    (
        ["pgpo-sde", "weak-error", "--optimizer", "adamw", "--regime", "fixed", "--betas", "1,0"],
        "--betas",
    ),  # fmt: skip
    (["pgpo-sde", "weak-error", "--optimizer", "adamw", "--etas", "0.6"], "too large"),
    (["pgpo-sde", "weak-error", "--regime", "ballistic"], "--optimizer adamw"),
    (["pgpo-sde", "simulate", "--eta", "1e-300", "--paths", "2"], "steps per path"),
    (["pgpo-sde", "simulate", "--eta", "2"], "--eta"),
    (["pgpo-sde", "simulate", "--paths", "0"], "--paths"),
    (["pgpo-sde", "simulate", "--paths", "2", "--out", "a_file"], "not a folder"),
    (["pgpo-sde", "simulate", "--horizon", "0"], "--horizon"),
    # --- pgpo-check -------------------------------------------------------------------------
    (["pgpo-check", "rho", "--alpha", "0"], "--alpha"),
    (["pgpo-check", "rho", "--rho-max", "0.5"], "rho_max"),
    (["pgpo-check", "report", "--alpha", "101"], "alpha must be in (0, 100]"),
    (["pgpo-sde", "weak-error", "--alpha", "1e308"], "alpha must be in (0, 100]"),
    (["pgpo-check", "rho", "--kind", "foo"], "--kind"),
    (["pgpo-check", "report", "--log", "missing.jsonl"], "missing.jsonl"),
    (["pgpo-check", "report", "--log", "log.jsonl"], "not JSON"),
    (["pgpo-check", "report", "--log", "info_text.jsonl"], "info_text.jsonl:1: info is 'abc'"),
    (["pgpo-check", "report", "--log", "binary.jsonl"], "binary.jsonl: not a text file"),
    (["pgpo-sde", "simulate", "--seed", "-1"], "--seed: must be >= 0"),
    (["pgpo-sde", "simulate", "--paths", "2", "--out", "/proc/x/y"], "(/proc/x/y)"),
    (["pgpo-check", "report", "--log", "eval_only.jsonl"], "no rows with an 'info' field"),
    (["pgpo-check", "report", "--out", "a_file", "--quick"], "not a folder"),
]
if importlib.util.find_spec("vllm") is None:
    CASES.append((TRAIN + ["rollout.engine=vllm"], "vLLM is not installed"))


@pytest.mark.parametrize("argv,needle", CASES, ids=[" ".join(a[1:])[:70] for a, _ in CASES])
def test_a_mistake_is_one_line_exit_2_and_changes_nothing(
    argv, needle, user_dir, checkpoints, capsys
):
    argv = [a.format(**{k: str(v) for k, v in checkpoints.items()}) for a in argv]
    ckpt_root = checkpoints["good"].parents[2]
    before, ckpt_before = snapshot(user_dir), snapshot(ckpt_root)
    code = PROGRAMS[argv[0]](argv[1:])
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{argv[0]}: error: "), err
    assert needle in lines[0], lines[0]
    assert out == ""
    assert snapshot(user_dir) == before  # nothing written, replaced or removed
    assert snapshot(ckpt_root) == ckpt_before


def test_the_corpus_is_large_and_covers_every_command():
    commands = {(argv[0], argv[1]) for argv, _ in CASES}
    assert len(CASES) >= 60
    for command in [("pgpo", c) for c in ("train", "eval", "export", "consolidate")] + [
        ("pgpo", "multiplier"), ("pgpo", "demo"), ("pgpo-sde", "weak-error"),
        ("pgpo-sde", "simulate"), ("pgpo-check", "rho"), ("pgpo-check", "report"),
    ]:  # fmt: skip
        assert command in commands
