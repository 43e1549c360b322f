"""The model card ``pgpo export`` writes as the exported folder's README.md.

On the Hugging Face Hub a model folder's README.md is its card: YAML metadata between ``---``
lines (``base_model``, ``library_name``, ``tags``, ``datasets``, read by the Hub's search and by
``huggingface_hub.ModelCard``), then text. The card says what a reader of the model needs: the
method and its settings, the teacher, the steps, the last evaluation, how to reproduce the run.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pgpo.train.run_folder.resume import describe

# Data sets known on the Hub by the names the trainer accepts (data.train / data.sciknoweval).
HUB_DATASETS = {"mmlu-science": "cais/mmlu", "sciknoweval": "hicai-zju/SciKnowEval"}
CITATION = """@misc{pgpo,
  title = {Physics-Guided Policy Optimization with Self-Distillation},
  eprint = {2606.03620},
  archivePrefix = {arXiv},
}"""


def datasets(config: dict) -> list[str]:
    """The run's training data as Hub dataset ids, where known (an ``hf:`` hub id, MMLU,
    SciKnowEval); local files and the synthetic set have none."""
    data = config.get("data", {})
    if data.get("sciknoweval"):
        return [HUB_DATASETS["sciknoweval"]]
    found = []
    for spec in (data.get("train", ""), data.get("test", "")):
        if spec in HUB_DATASETS:
            found.append(HUB_DATASETS[spec])
        elif spec.startswith("hf:") and spec.count(":") == 1 and not Path(spec[3:]).exists():
            found.append(spec[3:])  # hf:<hub id>
    return list(dict.fromkeys(found))


def last_evaluation(run_dir: Path, step: int) -> dict:
    """The last row with evaluation scores at or before ``step`` in the run's metrics.jsonl
    (``{}`` when there is none, or no log beside the checkpoint)."""
    found: dict = {}
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return found
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        scores = {k: v for k, v in row.items() if k.startswith("eval_")}
        if isinstance(row, dict) and scores and row.get("step", 0) <= step:
            found = {"step": row.get("step"), **scores}
    return found


def model_card(
    config: dict, step: int, role: str, run_dir: Path | None, resumes: list[dict] = ()
) -> str:
    """The README.md text for a checkpoint's export: ``config`` is the run's saved config (the
    settings in force at the checkpoint), ``step`` the checkpoint's, ``role`` "policy" or
    "teacher", ``resumes`` the run's record of resumes (:mod:`pgpo.train.run_folder.resume`)."""
    model, pgpo, teacher = config["model"], config["pgpo"], config["teacher"]
    method = "pgpo" if pgpo["enabled"] else "sdpo"
    tags = ["pgpo", "sdpo"] + (["lora"] if model["lora"]["rank"] else [])
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}
    meta = {"base_model": model["path"], **meta}  # a hub id, a local folder, or the tiny model
    if datasets(config):
        meta["datasets"] = datasets(config)
    if pgpo["enabled"]:
        how = (
            f"PGPO: SDPO with each AdamW step scaled by rho_k = min(exp(alpha I_k), rho_max), "
            f"alpha = {pgpo['alpha']:g}, rho_max = {pgpo['rho_max']:g} (kind `{pgpo['kind']}`)"
        )
    else:
        how = "SDPO (self-distilled policy optimization; no step multiplier)"
    rate = {"ema": f", rate {teacher['ema_rate']:g}", "trust_region": ""}.get(teacher["mode"], "")
    evaluation = last_evaluation(run_dir, step) if run_dir is not None else {}
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# {model['path']} after {step} steps of {method.upper()}",
        "",
        f"The {role} of a pgpo run"
        + ("" if role == "policy" else " (its self-teacher, not the trained policy)")
        + f", exported from its checkpoint at step {step} of {config['steps']}.",
        "",
        "## Training",
        "",
        f"- method: {how}",
        f"- teacher: `{teacher['mode']}`{rate}, shown a successful sibling's answer",
        f"- base model: `{model['path']}`"
        + (f", LoRA rank {model['lora']['rank']} (merged)" if model["lora"]["rank"] else ""),
        f"- data: train `{config['data']['train'] or config['data']['sciknoweval']}`",
        f"- optimizer: AdamW, lr {config['optim']['lr']:g}, batch {config['batch_size']} responses "
        f"({config['rollout']['n']} per question), seed {config['seed']}",
        *[f"- resumed at {line}" for line in describe(resumes)],
        "",
        "## Evaluation",
        "",
    ]
    if evaluation:
        lines += [f"At step {evaluation.pop('step')} (`metrics.jsonl`):", ""]
        lines += ["| score | value |", "|---|---|"]
        lines += [f"| {k.removeprefix('eval_')} | {v:.4g} |" for k, v in evaluation.items()
                  if isinstance(v, (int, float))]  # fmt: skip
    else:
        lines += ["No evaluation was logged up to this checkpoint."]
    lines += [
        "",
        "## Reproduce",
        "",
        "With pgpo installed, save the configuration below as `config.yaml`, then:"
        + (
            " (these are the settings in force at the checkpoint; the run changed some when it "
            "was resumed, as listed under Training)"
            if describe(resumes)
            else ""
        ),
        "",
        "```bash",
        "pgpo train --config config.yaml",
        "```",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=False).strip(),
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)
