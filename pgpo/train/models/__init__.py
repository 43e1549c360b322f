"""The policy and its teacher as modules: loading a model and its tokenizer (:mod:`.model`;
SmolLM2 offline, :mod:`.smollm2`), LoRA adapters (:mod:`.lora`), the forward pass that runs a
loss inside it (:mod:`.forward`), the teacher (:mod:`.teacher`), and their placement over ranks
with FSDP2 (:mod:`.distributed`)."""
