"""Where a compressed model is kept: the artifact (artifact.py: save / load), its strict reader
(reader.py: every file validated and bounded before use), training checkpoints (checkpoint.py),
all-or-nothing directory writes (atomic.py) and the transformers integration (hf_config.py, the
wrapper config.json; hf_integration.py, AutoModelForCausalLM.from_pretrained(artifact))."""
