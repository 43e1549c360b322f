"""`pgpo demo`: the trimmed real tokenizer, the task, and a short end-to-end run through the
trainer (the real transformers Qwen3ForCausalLM, no stand-ins)."""

import json
import random
import statistics

import pytest
from transformers import AutoTokenizer

from pgpo.cli import main as pgpo_main
from pgpo.demo import run as demo_run
from pgpo.demo.report import collapse_step
from pgpo.demo.vocab import BYTE_TOKENS, trim_tokenizer
from pgpo.demo.warmstart import WarmStartConfig, task_texts
from pgpo.train import loop
from pgpo.train.models.model import qwen3_tokenizer_dir
from pgpo.train.tasks.data import answer_text, load_jsonl, make_splits
from pgpo.train.tasks.prompts import chat_text, messages, teacher_messages
from tests.test_train import FIELDS as TRAIN_FIELDS

WARM = WarmStartConfig(hidden_size=64, steps=20)  # tiny: the smoke runs test wiring, not skill


@pytest.fixture(scope="module")
def full_tokenizer():
    return AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()))


@pytest.fixture(scope="module")
def trimmed(tmp_path_factory, full_tokenizer):
    train_q, test_q = make_splits(200, 20, seed=3)
    out = tmp_path_factory.mktemp("vocab")
    id_map = trim_tokenizer(qwen3_tokenizer_dir(), task_texts(full_tokenizer, train_q), out)
    return AutoTokenizer.from_pretrained(str(out)), id_map, train_q, test_q


def test_task_is_deterministic_disjoint_and_right():
    train_a, test_a = make_splits(300, 50, seed=1)
    train_b, test_b = make_splits(300, 50, seed=1)
    assert train_a == train_b and test_a == test_b
    assert make_splits(300, 50, seed=2)[0] != train_a
    option_sets = lambda qs: {q.prompt.split("\n\n")[1] for q in qs}
    assert not option_sets(train_a) & option_sets(test_a)
    for q in train_a + test_a:
        values = [int(line.split(": ")[1]) for line in q.prompt.split("\n\n")[1].splitlines()]
        assert len(set(values)) == 4
        assert "ABCD"[values.index(max(values))] == q.answer


def test_trimmed_tokenizer_encodes_like_the_full_one(trimmed, full_tokenizer):
    tok, id_map, train_q, test_q = trimmed
    assert len(tok) == len(set(id_map.values())) < 1000  # vs 151,669
    assert sorted(id_map.values()) == list(range(len(tok)))
    # Same tokens (renumbered) on the task's texts, held-out questions included: the chat
    # template and the BPE merges are the real ones.
    for q in train_q[:20] + test_q:
        for msgs in (messages(q), teacher_messages(q, answer_text(q.answer))):
            text = chat_text(tok, msgs)
            assert text == chat_text(full_tokenizer, msgs)
            full_ids = full_tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert ids == [id_map[i] for i in full_ids]
            assert tok.decode(ids) == text
    for special in ("<|im_end|>", "<|endoftext|>", "<think>"):
        assert (
            tok.convert_tokens_to_ids(special)
            == id_map[full_tokenizer.convert_tokens_to_ids(special)]
        )
    # Text the task never uses still round-trips (through the byte tokens).
    odd = "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich 🙂"
    ids = tok(odd, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == odd and min(ids) >= 0 and max(ids) < len(tok)
    assert len(ids) > len(full_tokenizer(odd)["input_ids"])  # fewer merges: more tokens
    assert all(i in range(len(tok)) for i in range(BYTE_TOKENS))


def test_collapse_step_detects_a_sustained_zero_reward():
    import numpy as np

    rng = random.Random(0)
    reward = [0.5 + 0.1 * rng.random() for _ in range(30)] + [0.02] * 10
    run = {"step": np.arange(1, 41), "reward": np.asarray(reward)}
    assert collapse_step(run) == 35  # the fifth low step, counting from step 31
    run["reward"][32] = 0.5  # one good step in the window: not yet
    assert collapse_step(run) == 38
    assert collapse_step({"step": np.arange(1, 11), "reward": np.full(10, 0.3)}) is None


def test_demo_runs_sdpo_and_pgpo_through_the_trainer(tmp_path, monkeypatch):
    calls = []
    real_train = loop.train

    def spy(cfg, *args, **kwargs):  # the real trainer, recorded
        calls.append(cfg)
        return real_train(cfg, *args, **kwargs)

    monkeypatch.setattr(loop, "train", spy)
    plan = demo_run.DemoPlan(
        tmp_path / "demo",
        [demo_run.SDPO, demo_run.pgpo_method(1.0)],
        seeds=[0],
        overrides=["steps=2", "batch_size=16", "eval.n=1", "eval.every=2"],
        warm=WARM,
        cache=tmp_path / "cache",
        workers=1,
        progress=False,
    )
    summary = demo_run.run_demo(plan)
    assert [c.pgpo.enabled for c in calls] == [False, True]
    out = plan.out
    assert (out / "curves.png").stat().st_size > 10_000
    assert "| sdpo | 1 |" in (out / "summary.md").read_text()
    assert len(load_jsonl(out / "data" / "test.jsonl").questions) == demo_run.N_TEST
    for name in ("sdpo-seed0", "pgpo-a1-seed0"):
        run = out / name
        assert (run / "config.yaml").exists() and (run / "checkpoints" / "step_000002").is_dir()
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1, 2]  # step 0: the warm start's evaluation
        assert all(f in r for r in rows[1:] for f in TRAIN_FIELDS)  # pgpo train's layout
        assert "eval_avg_at_k" in rows[0] and "eval_avg_at_k" in rows[2]
        assert summary["runs"][name]["start"] == rows[0]["eval_avg_at_k"]
        assert summary["runs"][name]["final"] == rows[2]["eval_avg_at_k"]
        rhos = [r["rho"] for r in rows[1:]]
        if name.startswith("sdpo"):
            assert rhos == [1.0, 1.0]
        else:  # rho = min(exp(I), 2) from the logged I
            for r in rows[1:]:
                assert r["rho"] == pytest.approx(min(2.0, pow(2.718281828459045, r["info"])))
    # Same warm start and seed: both runs start from the same held-out number.
    assert summary["runs"]["sdpo-seed0"]["start"] == summary["runs"]["pgpo-a1-seed0"]["start"]
    # The warm start is cached: a second plan reuses the folder.
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").exists()


def test_demo_cli_in_worker_processes(tmp_path, capsys):
    code = pgpo_main(
        [
            "demo",
            "--out",
            str(tmp_path / "d"),
            "--cache",
            str(tmp_path / "c"),
            "--steps",
            "1",
            "--warm-steps",
            "5",
            "--workers",
            "2",
            "batch_size=8",
            "eval.n=1",
            "data.max_test=8",
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert set(summary["runs"]) == {"sdpo-seed0", "pgpo-a1-seed0"}
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["demo", "--seeds", "0"], "--seeds"),
        (["demo", "optim.lr=-1"], "optim.lr"),
        (["demo", "nonsense.key=1"], "nonsense"),
        (["demo", "--real", "--collapse"], "not allowed"),
        (["demo", "--real", "teacher.temperature=0"], "teacher.temperature"),
        (["demo", "--real", "--questions", "0"], "--questions"),
    ],
)
def test_demo_cli_refuses_bad_input_in_one_line(argv, needle, capsys, tmp_path):
    assert pgpo_main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_demo_real_trains_smollm2_and_logs_its_exact_scores(tmp_path, capsys):
    """The --real path on the real model, offline from the pip package: the conversion is
    faithful and reused, and each run (SDPO, PGPO, SFT) logs the exact held-out scores before
    and after, which the summary's paired differences are computed from."""
    pytest.importorskip("gguf")
    import torch
    from transformers import AutoModelForCausalLM

    from pgpo.demo.real import CHANCE, METHODS, paired, run_real
    from pgpo.train.models.smollm2 import NAME, load_gguf, save_dequantized

    # The conversion: the saved copy computes what the GGUF-loaded model computes. (The GGUF is
    # loaded once, 26 s: smollm2.convert is load_gguf then save_dequantized.)
    folder = tmp_path / "cache" / NAME
    gguf, tokenizer = load_gguf()
    save_dequantized(gguf, tokenizer, folder)
    copy = AutoModelForCausalLM.from_pretrained(str(folder))
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30]])
    with torch.no_grad():
        torch.testing.assert_close(copy(ids).logits, gguf(ids).logits, rtol=0, atol=1e-4)
    del gguf, copy
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    summary = run_real(
        tmp_path / "real",
        steps=1,
        progress=False,
        cache=tmp_path / "cache",
        overrides=("data.max_test=4", "batch_size=2", "eval.edge_questions=0"),
        edge_questions=4,
        workers=1,  # in this process: the same runs, without three interpreters starting
    )
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not converted
    assert "converting" not in capsys.readouterr().err
    assert summary["questions"] == 4 and summary["chance"] == CHANCE == 0.25
    assert summary["teacher_check"]["edge_questions"] == 4
    for name in METHODS:
        rows = [json.loads(x) for x in (tmp_path / "real" / name / "metrics.jsonl").open()]
        assert [r["step"] for r in rows] == [0, 1] and not rows[1]["skipped"]
        for r in rows:  # the exact scores, before and after, logged by the trainer
            assert r["eval_questions"] == 4
            assert 0 < r["eval_p_correct"] <= r["eval_p_correct_given_letter"] <= 1
        # the summary's score is the trainer's last evaluation of the same weights
        mean, _ = summary["runs"][name]["p_correct_given_letter"]
        assert mean == pytest.approx(rows[1]["eval_p_correct_given_letter"], rel=1e-5)
    assert summary["before"]["p_correct"] == pytest.approx(rows[0]["eval_p_correct"], rel=1e-5)
    gain = summary["runs"]["pgpo"]["p_correct_vs_sdpo"]
    assert gain[0] == pytest.approx(
        summary["runs"]["pgpo"]["p_correct"][0] - summary["runs"]["sdpo"]["p_correct"][0]
    )
    diffs = [1.0, 2.0, 4.0]
    expected = (statistics.mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5)
    assert paired([d + 1 for d in diffs], [1.0] * 3) == pytest.approx(expected)
    for name in ("real.md", "real.json", "real.png"):
        assert (tmp_path / "real" / name).stat().st_size > 0


def test_one_process_builds_a_shared_cache_entry_the_others_wait_for_it(tmp_path):
    """``one_writer``, as ``pgpo demo`` (warm start) and ``--real`` (SmolLM2 conversion) use it:
    three processes start building the same cached folder at once; one builds it, the others
    wait and find it built. Without the lock each would build (each sees no folder yet)."""
    import subprocess
    import sys
    import textwrap

    folder = tmp_path / "cache" / "entry"
    builder = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from pgpo.outputs import output_files
        from pgpo.locking import one_writer
        folder = Path({str(folder)!r})
        time.sleep(float(sys.argv[1]))
        with one_writer(folder):
            if not (folder / "done").exists():
                time.sleep(1.0)  # a build that takes a while
                with output_files(folder) as tmp:
                    (tmp / "done").write_text(sys.argv[2])
                print("built")
            print("found", (folder / "done").read_text())
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", builder, str(0.1 * i), str(i)], stdout=subprocess.PIPE, text=True
        )  # fmt: skip
        for i in range(3)
    ]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(out.count("built") for out in outputs) == 1
    # Whichever got the lock first built it (process start-up times vary more than the
    # staggered sleeps on a loaded machine); every process found that one's build.
    (builder,) = [i for i, out in enumerate(outputs) if "built" in out]
    built_by = (folder / "done").read_text()
    assert built_by == str(builder)  # the folder holds the build of the one that said so
    assert all(out.strip().endswith(f"found {built_by}") for out in outputs)
    assert sorted(x.name for x in folder.parent.iterdir()) == ["entry"]  # no lock file left
