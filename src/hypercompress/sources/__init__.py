"""Where a model and its text come from: model sources (models.py: built-in names, GGUF files,
Hugging Face directories, hub ids, artifacts), a layer-at-a-time reader of large checkpoints
(streaming.py), the hub cache (hub.py) and calibration / evaluation text (data.py)."""
