"""The hybrid pipeline: a recipe for a whole-model size target beyond what quantization alone reaches.

Branches run in a sound order: structural (whole blocks removed) first, then weight-level (the
embedding factorized or quantized, the block linears as low-rank factors), then distillation
recovery (optional: it trains the factors and norms against the original model), then the lossless
stage (byte-grouped zstd, applied when the artifact is written). Sizes are exact storage bits of the
modules each stage creates (counted from empty modules of the planned layout), so the plan fits
before anything is compressed:

1. Above the quantization floor (every module at 2-bit codes, one scale per row) the budget planner
   (mixed_bits.py) allocates bits; this module handles targets below it.
2. Embedding: of the options whose storage stays within `EMBEDDING_SHARE` of the budget (4-, 3- or
   2-bit rows, factors of rank 256 down to 1), the one of lowest measured KL to the original on a
   calibration window (the tied lm_head follows it), or, when every option's KL is past
   SATURATED_KL, of lowest table error; without calibration, the largest.
3. Block linears: activation-aware low-rank factors (asvd, SVD-LLM whitening) of one rank r for
   every matrix; the first blocks get rank r + 1 while bits are left (so the plan lands within one
   block's rank step of the target). r never passes the break-even rank of the smallest matrix
   (`max_useful_rank`: past it the factors store more than the matrix); when the blocks reach it with
   bits left (a model whose embedding dwarfs its blocks), the embedding takes a larger option
   instead, if one fits.
4. If even rank 1 everywhere does not fit, the lowest-influence blocks are removed (ShortGPT block
   influence, methods/structured) until rank-1 factors of the remaining blocks fit; at least one
   block stays, else the target is refused with the smallest size the pipeline reaches
   (`smallest_plan`: one block of rank-1 factors, the smallest embedding option; fit_pipeline
   measures the file it stores).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..arch import arch_of, block_linear_names
from ..errors import UserError
from ..layers.low_rank_embedding import LowRankEmbedding
from ..layers.base import linear_weight
from ..modules import count_params

EMBEDDING_SHARE = 0.5   # the embedding may take at most this fraction of the whole budget
SATURATED_KL = 2.0      # nats: an embedding option this bad is ranked by its table's error instead
# embedding options, best first: ("rtn", bits) rows with one scale each, ("factor", rank, bits)
EMBEDDING_LADDER = (("rtn", 4), ("rtn", 3), ("rtn", 2), ("factor", 256, 4), ("factor", 128, 4),
                    ("factor", 64, 4), ("factor", 32, 4), ("factor", 16, 4), ("factor", 8, 4),
                    ("factor", 4, 16), ("factor", 2, 16), ("factor", 1, 16))


class BeyondReach(UserError):
    """The target is below the smallest plan the pipeline makes."""


@dataclass
class PipelinePlan:
    target_bpw: float
    stages: list[dict[str, Any]]
    planned_bits: int
    params: int
    notes: list[str] = field(default_factory=list)
    reached_bpw: float | None = None  # measured by fit_pipeline: the file's bytes x 8 / params

    @property
    def planned_bpw(self) -> float:
        return self.planned_bits / self.params


def useful_embedding_options(embedding: nn.Embedding) -> list[tuple]:
    """EMBEDDING_LADDER without the factorizations at or past their break-even rank (a small table)."""
    from ..methods.factor_embedding import max_useful_rank

    vocab, dim = embedding.weight.shape
    return [o for o in EMBEDDING_LADDER if o[0] == "rtn" or o[1] <= max_useful_rank(vocab, dim, o[2])]


def embedding_bits(embedding: nn.Embedding, option: tuple) -> int:
    """Exact storage of the embedding under an EMBEDDING_LADDER option."""
    from .mixed_bits import quant_bits

    if option[0] == "rtn":
        return quant_bits(embedding, (option[1], -1))
    vocab, dim = embedding.weight.shape
    return LowRankEmbedding(vocab, dim, option[1], option[2]).storage_bits()


@torch.no_grad()
def embedding_score(model: nn.Module, name: str, option: tuple, ids: torch.Tensor, reference: torch.Tensor
                    ) -> tuple[float, float]:
    """(KL(original || model with only the embedding compressed by `option`) on `ids`, the original's
    logits there being `reference`; the table's relative error ||E - E'||_F / ||E||_F)."""
    from ..apply import apply_recipe
    from ..recipe import Recipe
    from ..training.kl import kl_to_teacher

    trial = copy.deepcopy(model)
    apply_recipe(trial, Recipe.from_list([embedding_stage(name, option)]))
    table = model.get_submodule(name).weight.float()
    error = (trial.get_submodule(name).dense_weight() - table).norm() / table.norm()
    return kl_to_teacher(reference, trial(input_ids=ids).logits).item(), error.item()


def embedding_rank_key(score: tuple[float, float]) -> float:
    """Options ranked by KL; past SATURATED_KL (the embedding alone breaks the model, whichever
    option: SmolLM2's tied table factorized at rank 4 or 256 both measure KL 6-8) by the table's
    relative error, the capacity distillation recovers from."""
    kl, error = score
    return kl if kl < SATURATED_KL else SATURATED_KL + error


def embedding_stage(name: str, option: tuple) -> dict[str, Any]:
    targets = [f"^{re.escape(name)}$"]
    if option[0] == "rtn":
        return {"method": "rtn", "bits": option[1], "group_size": -1, "targets": targets}
    return {"method": "factor_embedding", "rank": option[1], "bits": option[2], "targets": targets}


def low_rank_bits(module: nn.Module, rank: int) -> int:
    """Storage of a LowRankLinear of `rank` replacing `module`: U, V (and any bias) in float16."""
    out_features, in_features = linear_weight(module).shape
    bias = getattr(module, "bias", None) is not None
    return 16 * (rank * (out_features + in_features) + (out_features if bias else 0))


@dataclass
class _Layout:
    """What plan_pipeline needs of a model: its sizes in bits, the block linears' costs and rank cap."""
    spec: Any
    params: int
    embedding: nn.Embedding
    embed_name: str
    fixed: int            # bits of everything the pipeline does not compress (norms, an untied head...)
    blocks: int
    bias: list[int]       # per block: its factors' bits at rank 0 (biases)
    slope: list[int]      # per block: bits per unit of rank
    ladder: list[tuple]   # the embedding options below their break-even rank
    cap: int              # the largest rank every block linear's factors store less than it at


def _layout(model: nn.Module) -> _Layout:
    from ..storage.artifact import storage_bits
    from ..methods.svd import max_useful_rank

    spec = arch_of(model.config.model_type)
    embedding = model.get_input_embeddings()
    embed_name = next(n for n, m in model.named_modules() if m is embedding)
    linears = block_linear_names(model)
    dense = sum(t.numel() * 16 for n in linears + [embed_name]
                for t in model.get_submodule(n).state_dict().values())
    blocks = len(model.get_submodule(spec.blocks))
    in_block = [[n for n in linears if n.startswith(f"{spec.blocks}.{b}.")] for b in range(blocks)]
    # a block's factors cost bias + rank x slope bits
    bias = [sum(low_rank_bits(model.get_submodule(n), 0) for n in names) for names in in_block]
    slope = [sum(low_rank_bits(model.get_submodule(n), 1) for n in names) - b for names, b in zip(in_block, bias)]
    shapes = {n: tuple(linear_weight(model.get_submodule(n)).shape) for n in linears}
    smallest = min(shapes, key=lambda n: (max_useful_rank(*shapes[n]), n))
    cap = max_useful_rank(*shapes[smallest])
    if cap < 1:
        out_f, in_f = shapes[smallest]
        raise UserError(f"{smallest} ({out_f}x{in_f}) is too small for low-rank factors of any rank to store "
                        "less than the matrix, so the pipeline below the quantization floor cannot compress "
                        "this model; ask for a target at or above the quantization floor")
    return _Layout(spec, count_params(model), embedding, embed_name, storage_bits(model) - dense, blocks, bias,
                   slope, useful_embedding_options(embedding), cap)


def plan_pipeline(model: nn.Module, target_bpw: float, distill_steps: int = 0,
                  calib: torch.Tensor | None = None, measured: dict | None = None) -> PipelinePlan:
    """Stages reaching `target_bpw` (whole-model, all stored bits / original params) by embedding
    compression, low-rank factors and, when needed, block removal; `distill_steps` > 0 appends a
    distillation stage; `measured` keeps the embedding options' KLs between calls. Raises UserError
    when the target is below the smallest plan."""
    lay = _layout(model)
    params, budget, embedding = lay.params, int(target_bpw * lay.params), lay.embedding
    share = [o for o in lay.ladder if embedding_bits(embedding, o) <= EMBEDDING_SHARE * budget]
    if calib is not None and len(share) > 1:
        measured = {} if measured is None else measured
        ids = calib[:1, :256]  # the first 256 tokens of the first calibration window
        if any(o not in measured for o in share):
            with torch.no_grad():
                reference = model(input_ids=ids).logits
        for option in share:
            if option not in measured:
                measured[option] = embedding_score(model, lay.embed_name, option, ids, reference)
        share.sort(key=lambda o: embedding_rank_key(measured[o]))
    rest = sorted((o for o in lay.ladder if o not in share), key=lambda o: embedding_bits(embedding, o))
    chosen = None  # (stages, notes, bits used)
    capped = None  # the fullest plan whose blocks stopped at the rank cap with bits left
    for option in share + rest:  # a larger share for the embedding only if no block fits beside it
        left = budget - lay.fixed - embedding_bits(embedding, option)
        stages = [embedding_stage(lay.embed_name, option)]
        notes = [f"embedding {stages[0]['method']} " + ", ".join(
            f"{k}={v}" for k, v in stages[0].items() if k in ("bits", "rank"))]
        fitted = _fit_blocks(lay.spec, lay.blocks, lay.bias, lay.slope, left, stages, notes, lay.cap)
        if fitted is None or (fitted[1] == "removed" and capped is not None):
            continue  # removing blocks is worse than every block at the rank cap
        used, kind = fitted
        planned = budget - left + used
        if kind != "capped":
            chosen = (stages, notes, planned)
            break
        if capped is None or planned > capped[2]:
            capped = (stages, notes, planned)
    chosen = chosen or capped
    if chosen is None:
        cost = min(b + s for b, s in zip(lay.bias, lay.slope))
        smallest = (lay.fixed + min(embedding_bits(embedding, o) for o in lay.ladder) + cost) / params
        raise BeyondReach(f"target {target_bpw:.4g} bpw ({16 / target_bpw:.4g}x) is beyond reach: the "
                          f"smallest pipeline (one block of rank-1 factors, the smallest embedding) plans "
                          f"{smallest:.4f} bpw ({16 / smallest:.1f}x); ask for at most that ratio")
    stages, notes, planned = chosen
    if distill_steps:
        stages.append(distill_stage(distill_steps))
        notes.append(f"distillation {distill_steps} steps")
    return PipelinePlan(target_bpw, stages, planned, params, notes)


def smallest_plan(model: nn.Module, distill_steps: int = 0) -> PipelinePlan:
    """The smallest plan the pipeline makes: the smallest embedding option and rank-1 factors of the
    one block kept (the others removed); planned for the costliest block, as plan_pipeline does."""
    lay = _layout(model)
    option = min(lay.ladder, key=lambda o: embedding_bits(lay.embedding, o))
    stages = [embedding_stage(lay.embed_name, option)]
    notes = [f"embedding {stages[0]['method']} " + ", ".join(
        f"{k}={v}" for k, v in stages[0].items() if k in ("bits", "rank"))]
    cost = max(b + s for b, s in zip(lay.bias, lay.slope))
    if lay.blocks > 1:
        stages.insert(0, {"method": "structured", "drop_layers": lay.blocks - 1, "mlp_keep": 1.0})
        notes.append(f"{lay.blocks - 1} of {lay.blocks} blocks removed (lowest block influence); asvd rank 1")
    else:
        notes.append("asvd rank 1")
    stages.append({"method": "asvd", "rank": 1})
    if distill_steps:
        stages.append(distill_stage(distill_steps))
        notes.append(f"distillation {distill_steps} steps")
    planned = lay.fixed + embedding_bits(lay.embedding, option) + cost
    return PipelinePlan(planned / lay.params, stages, planned, lay.params, notes)


def distill_stage(steps: int) -> dict[str, Any]:
    """The recovery stage both routes append for --distill: `steps` of 8 calibration windows."""
    return {"method": "distill", "steps": steps, "batch": 8, "lr": 1e-4}


def _fit_blocks(spec, blocks: int, bias: list[int], slope: list[int], left: int, stages: list, notes: list,
                cap: int) -> tuple[int, str] | None:
    """Append the block stages that fit `left` bits (low-rank factors of rank at most `cap`; blocks
    removed if rank 1 does not fit); returns (the bits they use, "capped" when the rank stopped at
    `cap` with bits left, "removed" when blocks are removed, else "fitted"), or None if not even one
    block of rank 1 fits."""
    if left >= sum(bias) + sum(slope):
        rank = int((left - sum(bias)) // sum(slope))
        if rank >= cap:  # past the break-even rank the factors would store more than the matrices
            stages.append({"method": "asvd", "rank": cap})
            notes.append(f"asvd rank {cap} (the largest useful rank)")
            return sum(bias) + cap * sum(slope), "capped"
        spare = left - sum(bias) - rank * sum(slope)
        upgraded = 0
        while upgraded < blocks and slope[upgraded] <= spare:
            spare -= slope[upgraded]
            upgraded += 1
        if upgraded:
            stages.append({"method": "asvd", "rank": rank + 1, "targets": _block_targets(spec, range(upgraded))})
        stages.append({"method": "asvd", "rank": rank, **({"ignore": _block_targets(spec, range(upgraded))}
                                                         if upgraded else {})})
        notes.append(f"asvd rank {rank} ({upgraded} of {blocks} blocks at rank {rank + 1})")
        return left - spare, "fitted"
    # the kept blocks are chosen by measured influence at compress time: plan for the costliest
    cost = sorted((b + s for b, s in zip(bias, slope)), reverse=True)
    keep = blocks
    while keep > 0 and sum(cost[:keep]) > left:
        keep -= 1
    if keep == 0:
        return None
    stages.insert(0, {"method": "structured", "drop_layers": blocks - keep, "mlp_keep": 1.0})
    stages.append({"method": "asvd", "rank": 1})
    notes.append(f"{blocks - keep} of {blocks} blocks removed (lowest block influence); asvd rank 1")
    return sum(cost[:keep]), "removed"


def _block_targets(spec, indices) -> list[str]:
    return [rf"^{re.escape(spec.blocks)}\.{i}\." for i in indices]


def fit_pipeline(model: nn.Module, target_bpw: float, calib: torch.Tensor | None, distill_steps: int = 0,
                 lossless: int | None = None, tolerance: float = 0.02, trials: int = 14,
                 device: str = "cpu", progress: Callable[[int, int, str], None] | None = None) -> PipelinePlan:
    """plan_pipeline, then measured (progress(trials done, at most trials + 1, note) after each): each trial compresses a copy (without the distillation, which
    does not change the size; whitened on 4 calibration windows, for speed: the sizes are those of
    the final factors, their coded bytes nearly so) and counts the bytes the artifact file would have
    (safetensors header and the lossless stage included); the planning budget is searched
    (fit.fit_budget) until the file lands within [target x (1 - tolerance), target], else the
    target is refused naming the sizes reached nearest it; the trials calibrate on `device`. The
    smallest plan is measured first: a target under the file it stores is refused as beyond reach,
    naming that size. Returns the plan, `reached_bpw` set."""
    import json

    from ..apply import apply_recipe
    from ..storage.artifact import stored_bytes
    from .fit import HEADROOM, Trial, _ask, _size, fit_budget
    from ..recipe import Recipe

    measured, params = {}, count_params(model)
    done = [0]

    def replan(budget: float) -> PipelinePlan | None:
        try:
            return plan_pipeline(model, budget, distill_steps, calib, measured)
        except BeyondReach:  # below the smallest pipeline
            return None

    def stored(plan: PipelinePlan) -> float:
        trial = copy.deepcopy(model)  # a few calibration windows: the factors' values, not their quality
        apply_recipe(trial, Recipe.from_list([s for s in plan.stages if s["method"] != "distill"]),
                 None if calib is None else calib[:4], device=device)
        plan.reached_bpw = stored_bytes(trial, lossless) * 8 / params
        done[0] += 1
        if progress:
            progress(done[0], trials + 1, f"at most; last trial {plan.reached_bpw:.3f} bpw")
        return plan.reached_bpw

    smallest = smallest_plan(model, distill_steps)
    if stored(smallest) > target_bpw:
        raise BeyondReach(f"target {_size(target_bpw)} is beyond reach: the smallest plan ("
                          + "; ".join(smallest.notes) + f") stores {_size(smallest.reached_bpw)}; ask for "
                          + _ask(smallest.reached_bpw, "least", HEADROOM))
    if smallest.reached_bpw >= target_bpw * (1 - tolerance):
        return smallest
    return fit_budget(replan, stored, lambda p: p.planned_bpw, lambda p: json.dumps(p.stages, sort_keys=True),
                      target_bpw, (0.0, 16.0), tolerance, trials, under=Trial(smallest, smallest.reached_bpw))
