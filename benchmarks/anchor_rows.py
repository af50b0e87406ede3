"""The side-by-side settings: our recipe and the llm-compressor modifier for each row.

llm-compressor modifiers are built lazily (only its own environment imports it). Both sides quantize
or prune every block linear and leave embeddings, norms and lm_head in 16 bits.
"""

from __future__ import annotations


def _gptq(bits: int):
    def build():
        from llmcompressor.modifiers.quantization import GPTQModifier

        scheme = {"targets": ["Linear"], "weights": {"num_bits": bits, "type": "int", "symmetric": False,
                                                     "strategy": "group", "group_size": 64}}
        return GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    return build


def _prune(kind: str, sparsity: float, structure: str):
    def build():
        if kind == "sparsegpt":
            from llmcompressor.modifiers.pruning import SparseGPTModifier as Modifier
        else:
            from llmcompressor.modifiers.pruning import WandaPruningModifier as Modifier
        return Modifier(sparsity=sparsity, mask_structure=structure, targets=["Linear"],
                        ignore=["lm_head"])
    return build


ROWS = {
    "gptq-w4g64": {"ours": [{"method": "gptq", "bits": 4, "group_size": 64, "act_order": True}],
                   "llmcompressor": _gptq(4)},
    "gptq-w3g64": {"ours": [{"method": "gptq", "bits": 3, "group_size": 64, "act_order": True}],
                   "llmcompressor": _gptq(3)},
    "sparsegpt-50": {"ours": [{"method": "sparsegpt", "sparsity": 0.5}],
                     "llmcompressor": _prune("sparsegpt", 0.5, "0:0")},
    "sparsegpt-2:4": {"ours": [{"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"}],
                      "llmcompressor": _prune("sparsegpt", 0.5, "2:4")},
    "wanda-50": {"ours": [{"method": "wanda", "sparsity": 0.5}],
                 "llmcompressor": _prune("wanda", 0.5, "0:0")},
    "wanda-2:4": {"ours": [{"method": "wanda", "sparsity": 0.5, "pattern": "2:4"}],
                  "llmcompressor": _prune("wanda", 0.5, "2:4")},
    # activation-aware low-rank against plain SVD (baseline.py) at the same 50% of parameters
    "asvd-50-cholesky": {"ours": [{"method": "asvd", "keep": 0.5, "whitening": "cholesky"}],
                         "llmcompressor": None},
    "asvd-50-scale": {"ours": [{"method": "asvd", "keep": 0.5, "whitening": "scale"}],
                      "llmcompressor": None},
    # uniform 3-bit everywhere (embedding included): the yardstick for the planner rows below
    "uniform-w3g64-all": {"ours": [{"method": "rtn", "bits": 3, "group_size": 64,
                                    "targets": ["^model\\.embed_tokens$"]},
                                   {"method": "gptq", "bits": 3, "group_size": 64, "act_order": True}],
                          "llmcompressor": None},
    # the uniform point nearest 3.0 bpw: one scale per row instead of per 64 columns (3.03 bpw)
    "uniform-w3row-all": {"ours": [{"method": "rtn", "bits": 3, "group_size": -1,
                                    "targets": ["^model\\.embed_tokens$"]},
                                   {"method": "gptq", "bits": 3, "group_size": -1, "act_order": True}],
                          "llmcompressor": None},
    **{f"planner-{t}bpw": {"ours": {"target_bpw": t}, "llmcompressor": None} for t in (4.0, 3.0, 2.5, 2.0)},
}
