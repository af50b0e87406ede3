"""Fully sharded data-parallel distillation (FSDP2, torch.distributed.fsdp.fully_shard) under a launcher.

    torchrun --nproc-per-node 8 -m hypercompress compress MODEL --target-bpw 3 --distill \\
        --calib FILE --device cuda --out DIR

Quantization-aware training holds, per weight, a float32 latent, its gradient and AdamW's two
moments: 16 bytes, about 108 GB for a 7B model, which no single GPU holds, so replicating the
student in every process (parallel.py's data parallelism, "ddp") cannot train it. Here every
process holds 1/N of those (Zhao et al. 2023, PyTorch FSDP; FSDP2 is its per-parameter DTensor form):
1. the student and the frozen teacher (distill.DistillPair, whose forward is one micro-batch's loss)
   are copied onto the meta device (no memory), the teacher in the engine's compute dtype
   (bfloat16 under bf16, as distill.py's unsharded teacher);
2. every decoder block of both becomes one FSDP unit and the pair the root unit (embeddings, output
   layers, final norms): the loss is computed inside the root's forward, so the output matrices
   the chunked KL multiplies by are whole there;
3. each unit is materialized on this process's device holding only its dim-0 shard of every tensor
   (rows [r c, (r + 1) c), c = ceil(rows / N): torch.chunk's split), copied from the caller's
   models, which leave the GPU first;
4. in the loop a block's weights are all-gathered for its forward and again for its backward, then
   freed; gradients are reduce-scattered as sums once per micro-batch (each process's loss is
   already divided by the step's batch, so the sum is the step's gradient); AdamW (fused on CUDA)
   steps plain views of the local shards: it is elementwise, so stepping each process's rows is
   stepping the tensor, and on DTensors every foreach op goes through DTensor's Python dispatch
   (232 ms of a 0.5 s qat step of SmolLM2 on an H100, profiled, where the fused kernel on plain
   tensors takes 3 ms); the gradient norm for clipping is the all-reduced sum of the local ones;
5. after training every trained tensor is gathered whole, one at a time, into the caller's
   parameters in every process, which then store, export and evaluate as after a one-process run:
   the artifact's format does not depend on sharding. Checkpoints are sharded (checkpoint.py).
Per GPU: 1/N of the latents, gradients, moments and the teacher, plus the gathered weights of the
block that runs. The caller's models stay whole on the host (every process loaded one).
Limits (a UserError under sharding: fsdp, a replicated run under auto): every trained tensor must be
used inside the forward (a hypernetwork's weights are generated outside it, and its generator is
small enough to replicate), all of one dtype (FSDP2 reduces one dtype per unit), trained by AdamW,
with no after-step hook (ReLoRA's merges); checkpoint files where every process can read them
(one host, or a shared file system).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from .. import parallel
from ..arch import arch_of
from ..errors import UserError
from .checkpoint import Layout, shard_rows
from .engine import Engine

# "auto" shards when a replicated run's state would take more than this share of a GPU's memory
# (activations, the gathered teacher outputs and the allocator's slack need the rest)
SHARD_ABOVE = 0.5


def replicated_bytes(student: nn.Module, teacher: nn.Module, params: dict[str, nn.Parameter], engine: Engine,
                     device: str) -> int:
    """Bytes one process holds to train unsharded: each trained tensor with its gradient and two
    float32 moments, the student's other tensors, and the teacher in the compute dtype."""
    trained = {id(p) for p in params.values()}
    state = sum(p.numel() * (2 * p.element_size() + 8) for p in {id(p): p for p in params.values()}.values())
    frozen = sum(p.numel() * p.element_size() for p in student.parameters() if id(p) not in trained)
    teacher_size = 2 if engine.dtype(device) == torch.bfloat16 else None
    held = sum(p.numel() * (teacher_size or p.element_size()) for p in teacher.parameters())
    return state + frozen + held


def decide(engine: Engine, student: nn.Module, teacher: nn.Module, params: dict[str, nn.Parameter], *,
           device: str, optimizer: str, generated: bool, after_step: bool) -> bool:
    """Whether this run shards (FSDP2) rather than replicates: in a process group (a launcher's),
    sharding "fsdp", or "auto" with several CUDA processes when replicated_bytes exceeds SHARD_ABOVE
    of the GPU's memory. Raises UserError when "fsdp" is asked for a run it cannot shard (the
    module docstring's limits)."""
    if engine.sharding == "ddp" or not (dist.is_available() and dist.is_initialized()):
        return False
    blockers = [why for why, present in (
        ("its trained weights are generated outside the model's forward (a hypernetwork's generator is "
         "replicated instead)", generated),
        ("optimizer adafactor is not sharded (use adamw)", optimizer != "adamw"),
        ("relora_every merges adapters between steps (set relora_every=0)", after_step),
        ("its trained tensors are of several dtypes", len({p.dtype for p in params.values()}) > 1))
        if present]
    if engine.sharding == "fsdp":
        if blockers:
            raise UserError(f"sharding=fsdp cannot shard this run: {blockers[0]}; or set sharding: ddp")
        return True
    if blockers or not parallel.active() or not str(device).startswith("cuda"):
        return False
    memory = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return replicated_bytes(student, teacher, params, engine, device) > SHARD_ABOVE * memory


def _meta_copy(model: nn.Module, dtype: torch.dtype | None, frozen: bool) -> nn.Module:
    """A deep copy of `model` whose parameters are on the meta device, contiguous (FSDP2 shards no
    other layout; a transposed Conv1D weight's values are copied by index all the same), `dtype`
    for floating ones when given, all frozen when `frozen`; buffers and the rest copied as they are."""
    memo = {}
    for p in model.parameters():
        if id(p) not in memo:
            kind = dtype if dtype is not None and p.is_floating_point() else p.dtype
            memo[id(p)] = nn.Parameter(torch.empty(p.shape, device="meta", dtype=kind),
                                       requires_grad=p.requires_grad and not frozen)
    return copy.deepcopy(model, memo)


def _units(model: nn.Module) -> list[nn.Module]:
    return list(model.get_submodule(arch_of(model.config.model_type).blocks))


class ShardedPair:
    """The sharded copy of a DistillPair (see the module docstring): `module` to run, `params` its
    trained tensors (DTensors) by the caller's names; `gather()` writes them back whole."""

    def __init__(self, pair: nn.Module, params: dict[str, nn.Parameter], engine: Engine, device: str):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        self.caller = params
        names = {id(p): f"student.{name}" for name, p in pair.student.named_parameters()}
        missing = [n for n, p in params.items() if id(p) not in names]
        if missing:
            raise UserError(f"sharding=fsdp: the trained tensor '{missing[0]}' is not a parameter of the model's "
                            "modules; set sharding: ddp")
        fqns = {name: names[id(p)] for name, p in params.items()}
        pair.student.to("cpu")  # the shards are copied from these; the GPU keeps only the shards
        pair.teacher.to("cpu")
        teacher_dtype = torch.bfloat16 if engine.dtype(device) == torch.bfloat16 else None
        module = pair.with_models(_meta_copy(pair.student, None, False), _meta_copy(pair.teacher, teacher_dtype, True))
        module.teacher.eval()
        mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
        for unit in _units(module.student) + _units(module.teacher):
            fully_shard(unit, mesh=mesh)
        fully_shard(module, mesh=mesh)
        module.to_empty(device=device)
        self._fill(module, pair)
        for unit in module.modules():
            if isinstance(unit, FSDPModule):  # sums, not means: each process's loss is already / batch
                unit.set_gradient_divide_factor(1.0)
                unit.set_force_sum_reduction_for_comms(True)
        sharded = dict(module.named_parameters(remove_duplicate=False))
        self.module = module
        self.params = {name: sharded[fqn] for name, fqn in fqns.items()}
        self.views = {name: nn.Parameter(p.to_local().detach()) for name, p in self.params.items()}
        self.layout = Layout(dist.get_world_size(), dist.get_rank(), {n: tuple(p.shape) for n, p in self.params.items()})

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def point_views(self) -> None:
        """Each view at its shard's current storage (FSDP re-pads a shard at the first forward) and
        gradient, before the optimizer steps them."""
        for name, p in self.params.items():
            view = self.views[name]
            view.data = p.to_local().detach()
            view.grad = None if p.grad is None else p.grad.to_local()

    @staticmethod
    @torch.no_grad()
    def _fill(module: nn.Module, pair: nn.Module) -> None:
        """Every parameter's shard (this process's rows) and every buffer from the caller's pair."""
        whole = dict(pair.named_parameters(remove_duplicate=False))
        for name, p in module.named_parameters():
            local = p.to_local()
            shards, index = p.device_mesh.size(), p.device_mesh.get_local_rank()
            start, stop = shard_rows(p.shape[0], shards, index) if p.dim() else (0, 0)
            if p.dim() and local.shape[0] != stop - start:
                raise RuntimeError(f"FSDP sharded {name} into {local.shape[0]} rows, not {stop - start}")
            local.copy_(whole[name][start:stop] if p.dim() else whole[name])
        buffers = dict(pair.named_buffers(remove_duplicate=False))
        for name, buffer in module.named_buffers():
            buffer.copy_(buffers[name])

    @torch.no_grad()
    def gather(self) -> None:
        """Each trained tensor whole into the caller's parameter (every process, one at a time)."""
        for name, p in self.params.items():
            self.caller[name].copy_(p.full_tensor())


@torch.no_grad()
def clip_grad_norm(views: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over tensors split by rows between the processes: the 2-norm
    of the whole gradient from the all-reduced squares of the local ones, every local gradient
    scaled by min(1, max_norm / (norm + 1e-6)). Returns the norm."""
    grads = [v.grad for v in views if v.grad is not None]
    squared = torch.nn.utils.get_total_norm(grads).float() ** 2
    dist.all_reduce(squared)
    norm = squared.sqrt()
    torch.nn.utils.clip_grads_with_norm_(views, max_norm, norm)
    return norm
