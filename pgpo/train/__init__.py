"""The SDPO / PGPO trainer.

The recipe sits here: the config (:mod:`.config`), the step loop (:mod:`.loop`) over a run
(:mod:`.run`), the step as Algorithm 1 (:mod:`.step`; the SFT yardstick, :mod:`.sft`), its loss
(:mod:`.loss`) and metrics. Its components are packages it calls, which never call it:

- :mod:`.tasks`: what a question is, the data, rewards and prompts;
- :mod:`.rollout`: the rollout seam and one module per engine (transformers, vLLM);
- :mod:`.models`: policy, teacher, LoRA, FSDP2;
- :mod:`.run_folder`: logs, checkpoints, resume, export;
- :mod:`.evaluation`: held-out and exact scores, the premise study's record.

:mod:`.experiments` (sweep, table) and :mod:`.gpu` (GPU checks) are tools built on the recipe.
"""
