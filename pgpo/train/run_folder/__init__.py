"""A run's folder and what survives the process: the folder, its lock and its logs
(:mod:`.run_dir`), checkpoints (:mod:`.checkpoint`) and the run state they hold
(:mod:`.run_state`), what a resume may change (:mod:`.resume`), and export to a transformers
folder with a model card (:mod:`.export`, :mod:`.model_card`)."""
