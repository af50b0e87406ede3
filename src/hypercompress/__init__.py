"""hypercompress: make Hugging Face causal LMs smaller and prove what it cost.

    result = hypercompress.compress("smollm2-135m", target_bpw=4.0, calib="valid.txt", out="smol-4bpw")
    model, tokenizer = hypercompress.load("smol-4bpw")
"""

from .analysis.edit import edit
from .analysis.report import analyze
from .api import compress as apply_recipe
from .artifact import load, save
from .eval.evaluation import evaluate
from .hf_integration import register as _register_with_transformers
from .registry import list_methods
from .workflow import CompressResult, compress

_register_with_transformers()  # AutoModelForCausalLM.from_pretrained(artifact_dir) works

__all__ = ["compress", "CompressResult", "apply_recipe", "analyze", "edit", "evaluate", "save", "load", "list_methods"]
__version__ = "0.1.0"
