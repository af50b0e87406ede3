"""The recovery-training engine every trained method uses (qat, distill, hypernet).

`engine.py`: precision (bf16 autocast with float32 master tensors on CUDA), compilation, micro-batches
and gradient accumulation, token / wall-time budgets; `kl.py`: KL to the teacher over the vocabulary
in chunks of positions (no full float32 logits); `distill.py`: the distillation loop itself;
`corpus.py`: the training corpus the original model writes itself, cached under a content hash.
This file imports nothing: import the submodules directly.
"""
