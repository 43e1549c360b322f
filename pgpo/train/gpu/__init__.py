"""GPU-path tooling, run on a GPU machine: ``python -m pgpo.train.gpu.check`` (every path of
the trainer on the GPUs there, briefly) and ``python -m pgpo.train.gpu.smoke`` (the Qwen3-8B
presets under torchrun); see docs/scaling.md."""
