"""`kv_lowrank`: joint low-rank key/value projections with a shared latent (layers/latent_kv.py).

Per block, W = [W_k; W_v] (2 n_kv d, D) is factored as B A with A (r, D) shared by every key and
value head. With `whiten` (default) the factorization minimises the output error on calibration
inputs, ||(W - B A) S||_F with S the Cholesky factor of X^T X (SVD-LLM, Wang et al. 2024), else
plain truncated SVD. The attention then caches the r-value latent (plus a position) per token
instead of 2 n_kv d keys and values: both the weights and the KV cache shrink.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch import arch_of
from ..config import MethodConfig, check
from ..errors import UserError
from ..layers.latent_kv import LatentKV, LatentValue
from ..layers.base import CompressedModule, linear_bias, linear_weight
from ..modules import replace_module
from ..registry import register
from .asvd import cholesky_whitening, whitened_factors
from .base import WholeModelMethod
from .damping import DAMP_RANGE
from ..linalg import truncated_svd


@dataclass
class KvLowRankConfig(MethodConfig):
    keep: float = 0.5       # latent width r as a fraction of 2 n_kv d (the keys and values per token)
    rank: int | None = None  # fixed r; when set, `keep` is not used
    whiten: bool = True     # activation-aware (calibration inputs) instead of plain SVD
    damp: float = 0.01      # added to X^T X's diagonal, as a fraction of its mean
    samples: int = 8        # calibration windows measured

    def validate(self) -> None:
        check(0 < self.keep < 1, f"keep={self.keep}: must be in (0, 1)")
        check(self.rank is None or self.rank >= 1, f"rank={self.rank}: must be >= 1")
        check(0 < self.damp < 1, DAMP_RANGE.format(self.damp))
        check(self.samples >= 1, f"samples={self.samples}: must be >= 1")


@register("kv_lowrank", KvLowRankConfig)
class KvLowRank(WholeModelMethod):
    needs_teacher = False

    def check_model(self, model) -> None:
        spec = arch_of(model.config.model_type)
        if spec.attention is None:
            raise UserError(f"kv_lowrank needs separate k_proj / v_proj; {model.config.model_type} fuses them")
        if not spec.latent_kv:
            raise UserError(f"kv_lowrank: {model.config.model_type}'s attention (RoPE over part of each head, "
                            "sliding windows or soft-capped scores) is not the one its latent cache reproduces; "
                            "use another method for its k_proj / v_proj")

    def apply(self, model, names, teacher, calib, *, device="cpu", progress=None, checkpoint_dir=None,
              resume=False) -> None:
        c = self.config
        spec = arch_of(model.config.model_type)
        self.check_model(model)  # again for callers of apply itself (compress checked it first)
        blocks = model.get_submodule(spec.blocks)
        pairs = [(f"{spec.blocks}.{i}.{spec.attention[1]}", f"{spec.blocks}.{i}.{spec.attention[2]}")
                 for i in range(len(blocks))]
        if any(isinstance(model.get_submodule(n), CompressedModule) for pair in pairs for n in pair):
            raise UserError("kv_lowrank factors dense k_proj / v_proj: put it before stages that compress them")
        _check_rank(c, model, pairs)
        grams = _input_grams(model, [k for k, _ in pairs], calib[: c.samples], device) if c.whiten else {}
        for done, (k_name, v_name) in enumerate(pairs):
            k_layer, v_layer = model.get_submodule(k_name), model.get_submodule(v_name)
            W = torch.cat([linear_weight(k_layer), linear_weight(v_layer)])          # (2 n_kv d, D)
            rank = c.rank or max(1, int(c.keep * W.shape[0]))
            rank = min(rank, *W.shape)
            if c.whiten:
                B, A = whitened_factors(W, *cholesky_whitening(grams[k_name], c.damp, k_name), rank)
            else:
                B, A = truncated_svd(W, rank)
            split = linear_weight(k_layer).shape[0]
            key = LatentKV(W.shape[1], split, rank, k_layer.bias is not None)
            value = LatentValue(k_name, W.shape[1], W.shape[0] - split, rank, v_layer.bias is not None)
            with torch.no_grad():
                key.A.copy_(A.half())
                key.B.copy_(B[:split].half())
                value.B.copy_(B[split:].half())
                for module, layer in ((key, k_layer), (value, v_layer)):
                    if module.bias is not None:
                        module.bias.copy_(linear_bias(layer).half())
            replace_module(model, k_name, key)
            replace_module(model, v_name, value)
            value.bind(model)
            key.bind(model)
            if progress:
                progress(done + 1, len(pairs), k_name)


def _check_rank(c: KvLowRankConfig, model, pairs: list[tuple[str, str]]) -> None:
    """A fixed rank must be at most the full rank of W = [W_k; W_v], min(2 n_kv d, D): past it the
    latent is wider than the keys and values it replaces and the factors add nothing (UserError)."""
    if c.rank is None:
        return
    for k_name, v_name in pairs:
        rows = sum(linear_weight(model.get_submodule(n)).shape[0] for n in (k_name, v_name))
        width = linear_weight(model.get_submodule(k_name)).shape[1]
        limit = min(rows, width)
        check(c.rank <= limit, f"kv_lowrank: rank={c.rank} is past the full rank {limit} of {k_name} / {v_name} "
                               f"({rows} keys and values per token, width {width}); set rank to 1..{limit} "
                               f"(below {rows} to shrink the cache), or use keep")


@torch.no_grad()
def _input_grams(model, names: list[str], calib: torch.Tensor, device: str) -> dict[str, torch.Tensor]:
    """X^T X / n (float64, on the CPU) of each named layer's inputs over the calibration windows."""
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def observe(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + (x.T @ x).cpu()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return observe

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    model.to(device)
    try:
        for start in range(0, calib.shape[0], 4):
            model(input_ids=calib[start: start + 4].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.to("cpu")
    return {n: grams[n] / counts[n] for n in names}
