"""Quantization-aware distillation (`qat`): latent weights and grid scales trained through the quantizer."""
