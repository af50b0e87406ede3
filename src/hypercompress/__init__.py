"""hypercompress: make Hugging Face causal LMs smaller and prove what it cost.

    model, tokenizer = hypercompress.load("artifact_dir")
"""

from .analysis.edit import edit
from .analysis.report import analyze
from .api import compress
from .artifact import load, save
from .eval.evaluation import evaluate
from .hf_integration import register as _register_with_transformers
from .registry import list_methods

_register_with_transformers()  # AutoModelForCausalLM.from_pretrained(artifact_dir) works

__all__ = ["compress", "analyze", "edit", "evaluate", "save", "load", "list_methods"]
__version__ = "0.1.0"
