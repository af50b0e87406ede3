"""Mixtures of experts as one linear per expert matrix, so that every linear method applies to them.

transformers (5.x) keeps a sparse MLP's experts fused in 3-D parameters: `gate_up_proj` (E, 2I, D),
rows [gate; up] per expert, and `down_proj` (E, D, I) (Mixtral, Qwen3-MoE, OLMoE share that module
and its forward). `unfuse_experts` replaces each such module by `ExpertLinears`: expert e becomes
`{experts}.{e}.gate_up_proj` (nn.Linear D -> 2I) and `{experts}.{e}.down_proj` (I -> D), with the same
forward (each token through its top-k experts, weighted by the router), so quantization, pruning and
their calibration see one ordinary linear per expert matrix, and a calibration hook on an expert's
linear sees exactly the tokens routed to it. The router stays as it is (not a linear of the block:
no stage selects it, and it is stored in 16 bits). `fuse_experts` puts the fused module back with
dense weights (exports to formats that read transformers' layout; plain save_pretrained).

Calibration (layerwise.run_layerwise): an expert the calibration text rarely routes to would get a
Hessian from a handful of tokens (or none: GPTQ could not solve it). `ExpertLinears.calibrating()`
records the tokens each expert is routed; `top_up(minimum)` then feeds every expert routed fewer than
`minimum` tokens (MIN_EXPERT_TOKENS) that many more of the block's calibration tokens that were
not routed to it, through its linears only (outputs discarded: the block's output is unchanged),
as other toolkits' fixes route calibration through every expert. The counts (routed, added) per
expert go to the stage's report.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

MIN_EXPERT_TOKENS = 256
"""Calibration tokens each expert's linears see at least: its routed ones, topped up with tokens
routed elsewhere when fewer. A stated floor, not a tuned one: an expert routed a handful of tokens
(or none) would otherwise get a Hessian that is mostly (or only) damping."""


class ExpertMLP(nn.Module):
    """One expert: act(x G^T) * (x U^T), then D^T, with [G; U] the rows of `gate_up_proj`."""

    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module, act_fn: nn.Module):
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj
        self._act = [act_fn]  # shared with the fused module, not a child of each expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self._act[0](gate) * up)


class ExpertLinears(nn.ModuleList):
    """The experts of one sparse MLP, expert e at index e (an ExpertMLP); forward(hidden (N, D),
    top_k_index (N, k), top_k_weights (N, k)) -> (N, D) as transformers' fused experts compute it.
    `fused` holds the module it replaced (its 3-D parameters freed), for fuse_experts."""

    def __init__(self, experts: list[ExpertMLP], fused: nn.Module):
        super().__init__(experts)
        self._fused = [fused]  # a list keeps it out of the children (and the state dict)
        self._record: dict | None = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        routed = torch.zeros(hidden_states.shape[0], len(self), dtype=torch.bool, device=hidden_states.device)
        routed.scatter_(1, top_k_index.clamp(0, len(self) - 1), top_k_index < len(self))
        for e in routed.any(0).nonzero()[:, 0].tolist():
            slot, token = torch.where(top_k_index.T == e)  # transformers' order: by slot, then token
            y = self[e](hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        if self._record is not None:
            self._record["inputs"].append(hidden_states.detach())
            self._record["routed"].append(routed)
        return out

    @contextlib.contextmanager
    def calibrating(self) -> Iterator[None]:
        """Record each forward's tokens and their routing until the block is exited (top_up reads them)."""
        self._record = {"inputs": [], "routed": []}
        try:
            yield
        finally:
            self._record = None

    @torch.no_grad()
    def top_up(self, minimum: int = MIN_EXPERT_TOKENS) -> list[tuple[int, int]]:
        """Feed each expert routed fewer than `minimum` tokens while calibrating that many more of
        the recorded tokens routed elsewhere (the earliest first), through its linears only.
        Returns [(tokens routed, tokens added)] per expert."""
        if self._record is None or not self._record["inputs"]:
            return [(0, 0)] * len(self)
        inputs = torch.cat(self._record["inputs"])
        routed = torch.cat(self._record["routed"])
        counts = []
        for e, expert in enumerate(self):
            seen = int(routed[:, e].sum())
            extra = (~routed[:, e]).nonzero()[:, 0][:max(minimum - seen, 0)]
            if len(extra):
                expert(inputs[extra])
            counts.append((seen, len(extra)))
        return counts


def _fused_experts(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(full name, module) of every experts module of the blocks (fused or not)."""
    from .arch import arch_of, submodule_or_none

    spec = arch_of(model.config.model_type)
    if not spec.experts:
        return
    for index, block in enumerate(model.get_submodule(spec.blocks)):
        module = submodule_or_none(block, spec.experts)
        if module is not None:  # (not in a dense block of a family that mixes them: Qwen3-MoE's mlp_only_layers)
            yield f"{spec.blocks}.{index}.{spec.experts}", module


@contextlib.contextmanager
def routed_calibration(experts: dict[str, ExpertLinears], minimum: int = MIN_EXPERT_TOKENS
                       ) -> Iterator[dict[str, list[tuple[int, int]]]]:
    """While inside, `experts` (name -> module) record their routing; on a normal exit each tops its
    experts up (ExpertLinears.top_up: run it while the calibration hooks are still attached) and the
    yielded dict fills with [(tokens routed, tokens added)] per expert, by name."""
    counts: dict[str, list[tuple[int, int]]] = {}
    with contextlib.ExitStack() as recording:
        for module in experts.values():
            recording.enter_context(module.calibrating())
        yield counts
        for name, module in experts.items():
            counts[name] = module.top_up(minimum)


def has_unfused_experts(model: nn.Module) -> bool:
    return any(isinstance(m, ExpertLinears) for m in model.modules())


def unfuse_experts(model: nn.Module) -> nn.Module:
    """Replace every fused experts module of `model` (arch table: ArchSpec.experts) by ExpertLinears
    holding copies of its weights (on the meta device when the model is: no memory), in place.
    Idempotent; a dense family is returned untouched. Raises UserError for experts whose layout
    differs from transformers' fused one (gate_up_proj (E, 2I, D), down_proj (E, D, I)). A model
    handed back to a user also needs modules.guard_plain_saves (a plain save_pretrained fuses them)."""
    from .errors import UserError

    for name, module in list(_fused_experts(model)):
        if isinstance(module, ExpertLinears):
            continue
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3
                and down.dim() == 3 and gate_up.shape[0] == down.shape[0] and gate_up.shape[1] == 2 * down.shape[2]
                and gate_up.shape[2] == down.shape[1]):
            raise UserError(f"{name}: experts not in transformers' fused layout (gate_up_proj (E, 2I, D), "
                            f"down_proj (E, D, I)); this family's experts are not supported")
        experts, hidden, inner = gate_up.shape[0], gate_up.shape[2], down.shape[2]
        top_k = getattr(model.config, "num_experts_per_tok", None)
        if not (isinstance(top_k, int) and 1 <= top_k <= experts):
            raise UserError(f"num_experts_per_tok {top_k!r} in the model's config: each token must go to 1 to "
                            f"{experts} of its {experts} experts; fix config.json")
        device, dtype = gate_up.device, gate_up.dtype
        built = []
        for e in range(experts):
            first = nn.Linear(hidden, 2 * inner, bias=False, device=device, dtype=dtype)
            second = nn.Linear(inner, hidden, bias=False, device=device, dtype=dtype)
            if device.type != "meta":
                first.weight.data.copy_(gate_up.data[e])
                second.weight.data.copy_(down.data[e])
            built.append(ExpertMLP(first, second, module.act_fn))
        # the fused parameters freed (kept as meta placeholders of their shape for fuse_experts)
        module.gate_up_proj = nn.Parameter(torch.empty(gate_up.shape, dtype=dtype, device="meta"), requires_grad=False)
        module.down_proj = nn.Parameter(torch.empty(down.shape, dtype=dtype, device="meta"), requires_grad=False)
        model.set_submodule(name, ExpertLinears(built, module))
    return model


def _dense(linear: nn.Module) -> torch.Tensor:
    """The weight an expert's linear computes with (a compressed one's reconstructed), float32."""
    return linear.dense_weight(torch.float32) if hasattr(linear, "dense_weight") else linear.weight.detach().float()


def fuse_experts(model: nn.Module) -> nn.Module:
    """Put every ExpertLinears back as the fused module it replaced, holding its experts' dense
    weights (gate_up (E, 2I, D), down (E, D, I); compressed experts reconstructed) in the dtype of
    its first dense linear (else the original's), in place: transformers' own layout and state dict."""
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertLinears)]:
        fused = module._fused[0]
        first = module[0].gate_up_proj
        dtype = first.weight.dtype if type(first) is nn.Linear else fused.gate_up_proj.dtype
        gate_up = torch.stack([_dense(e.gate_up_proj) for e in module]).to(dtype)
        down = torch.stack([_dense(e.down_proj) for e in module]).to(dtype)
        fused.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
        fused.down_proj = nn.Parameter(down, requires_grad=False)
        model.set_submodule(name, fused)
    return model


@contextlib.contextmanager
def fused(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with its experts fused for the duration (a plain save_pretrained), unfused after."""
    if not has_unfused_experts(model):
        yield model
        return
    fuse_experts(model)
    try:
        yield model
    finally:
        unfuse_experts(model)


def routing_report(counts: dict[str, list[tuple[int, int]]], minimum: int = MIN_EXPERT_TOKENS) -> dict:
    """The stage report's entry for expert calibration: the minimum and, per experts module,
    [tokens routed, tokens added] per expert."""
    return {"min_tokens": minimum, "experts": {name: [list(c) for c in per] for name, per in counts.items()}}


__all__ = ["MIN_EXPERT_TOKENS", "ExpertLinears", "ExpertMLP", "fuse_experts", "fused",
           "has_unfused_experts", "routed_calibration", "routing_report", "unfuse_experts"]
