"""A Problem from a per-example torch loss (torch.func) against the analytic toys, and the
documented MLP example."""

from __future__ import annotations

import numpy as np
import torch

from sde.problems import TorchProblem, make_problem


def test_torch_quadratic_equals_the_analytic_one():
    q = make_problem("quadratic")
    A = torch.as_tensor(q.A)

    def loss(theta, ex):
        diff = theta - ex["x"]
        return 0.5 * diff @ A @ diff

    def info(theta, ex):
        return q.info_scale * (loss(theta, ex) - q.info_offset)

    t = TorchProblem("torch-quadratic", loss, info, {"x": q.x}, q.theta0)
    theta = np.random.default_rng(0).standard_normal((7, q.d)) * 2
    assert t.n == q.n and t.d == q.d
    np.testing.assert_allclose(t.fields(theta), q.fields(theta), rtol=0, atol=1e-10)
    np.testing.assert_allclose(t.infos(theta), q.infos(theta), rtol=0, atol=1e-10)


def test_torch_logistic_equals_the_analytic_one():
    lg = make_problem("logistic")

    def loss(theta, ex):
        margin = ex["y"] * (ex["x"] @ theta)
        return torch.nn.functional.softplus(-margin) + 0.5 * lg.lam * theta @ theta

    def info(theta, ex):
        z = ex["x"] @ theta
        p = torch.sigmoid(z)
        return -(
            p * torch.nn.functional.logsigmoid(z) + (1 - p) * torch.nn.functional.logsigmoid(-z)
        )

    t = TorchProblem("torch-logistic", loss, info, {"x": lg.x, "y": lg.y}, lg.theta0)
    theta = np.random.default_rng(1).standard_normal((7, lg.d)) * 3
    np.testing.assert_allclose(t.fields(theta), lg.fields(theta), rtol=0, atol=1e-10)
    np.testing.assert_allclose(t.infos(theta), lg.infos(theta), rtol=0, atol=1e-10)


def test_the_documented_mlp_example_runs_as_written(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "sde.md").read_text()
    code = page.split("## Bring your own loss")[1].split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/sde.md", "exec"), {"__name__": "example"})
    out = capsys.readouterr().out
    assert "paper" in out and "matched" in out  # one verdict line per model
