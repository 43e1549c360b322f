"""The SDPO / PGPO trainer: config, data, rewards, prompts, rollouts, teacher, step, loop."""
