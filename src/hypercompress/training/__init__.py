"""The recovery engine's parts (qat, distill, hypernet, kan use them). Import the submodules
directly (e.g. `from hypercompress.training.corpus import teacher_corpus`): this file imports nothing."""
