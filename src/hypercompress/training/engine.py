"""How a recovery run uses the hardware, and how long it trains: one settings object for every
trained method (qat, distill, hypernet).

Precision: "bf16" runs forward and backward under bfloat16 autocast while the trained tensors,
AdamW's moments and the losses stay float32 (master weights, as mixed-precision training does);
the frozen teacher is a bfloat16 copy. "fp32" is the reference path. "auto" is bf16 on CUDA and
fp32 on a CPU (CPUs without native bf16 run it slower, and the tests compare against fp32).
Compilation: each decoder block of the student and the teacher is compiled (torch.compile), so a
fake quantizer's round / clamp / rescale fuses with its matmul's operand load instead of writing
another copy of every weight per step; "auto" compiles on CUDA only.
Micro-batches: `micro_batch` windows per forward and backward, gradients accumulated to the step's
`batch` (every loss term is a mean over windows, so the accumulated gradient is the whole batch's,
on one process or several). Windows are packed: each is `L` consecutive tokens of running text
or of the teacher's own writing, no padding.
Budgets: `train_tokens` fixes the number of steps (tokens / (batch x L)); `max_minutes` bounds the
wall time of the training loop (qat's end-to-end phase; its corpus and Block-AP are timed apart in
its report): once the measured speed says the steps will not fit, the schedule is shortened to the
steps that do (the cosine decay still ends at its floor) and training stops there. A run whose
token budget fits its time budget is deterministic; one stopped by time says so in its history.
Sharding (under a launcher, parallel.py): "ddp" keeps a whole student and teacher in every process
and sums the gradients; "fsdp" shards the trained tensors, their gradients and AdamW's moments and
the teacher over the processes (training/sharding.py); "auto" shards on CUDA when the replicated
state would not fit in SHARD_ABOVE of a GPU's memory.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError

PRECISIONS = ("auto", "bf16", "fp32")
SHARDINGS = ("auto", "fsdp", "ddp")
WARMUP_STEPS = 5  # steps (compilation included) before the time budget's speed estimate is trusted


@dataclass
class Engine:
    precision: str = "auto"
    compile: bool | None = None   # None: on CUDA
    micro_batch: int = 0          # windows per forward / backward; 0: the whole step's batch
    train_tokens: int = 0         # 0: the caller's step count
    max_minutes: float = 0.0      # 0: no time limit
    sharding: str = "auto"        # under a launcher: "fsdp", "ddp", or "auto" (fsdp when ddp would not fit)

    def validate(self, batch: int) -> None:
        if self.precision not in PRECISIONS:
            raise UserError(f"precision={self.precision!r}: must be one of {', '.join(PRECISIONS)}")
        if self.micro_batch < 0 or (self.micro_batch and batch % self.micro_batch):
            raise UserError(f"micro_batch={self.micro_batch}: must divide the batch {batch} (0: the whole batch)")
        if self.train_tokens < 0:
            raise UserError(f"train_tokens={self.train_tokens}: must be > 0 (or 0: the step count decides)")
        if not (self.max_minutes >= 0 and math.isfinite(self.max_minutes)):
            raise UserError(f"max_minutes={self.max_minutes}: must be > 0 (or 0: no time limit)")
        if self.sharding not in SHARDINGS:
            raise UserError(f"sharding={self.sharding!r}: must be one of {', '.join(SHARDINGS)}")

    def dtype(self, device: str | torch.device) -> torch.dtype:
        """The compute dtype: bfloat16 or float32."""
        cuda = str(device).startswith("cuda")
        return torch.bfloat16 if self.precision == "bf16" or (self.precision == "auto" and cuda) else torch.float32

    def compiles(self, device: str | torch.device) -> bool:
        return str(device).startswith("cuda") if self.compile is None else bool(self.compile)

    def autocast(self, device: str | torch.device):
        """bf16 autocast for the forward (and its backward), or nothing."""
        if self.dtype(device) == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)

    def steps(self, steps: int, tokens_per_step: int) -> int:
        """Optimizer steps of the run: from the token budget when given, else `steps`."""
        return max(1, math.ceil(self.train_tokens / tokens_per_step)) if self.train_tokens else steps


def frozen_teacher(teacher: nn.Module, engine: Engine, device: str) -> nn.Module:
    """The teacher as the loop runs it: a bfloat16 copy under bf16 precision (the caller's model is
    left as it was), else the model itself; compiled block by block when the engine compiles."""
    if engine.dtype(device) == torch.bfloat16:
        teacher = cast_copy(teacher, device, torch.bfloat16)
    teacher.eval()
    return teacher


def cast_copy(model: nn.Module, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """A deep copy of `model` on `device` whose floating-point parameters are `dtype` (frozen), each
    cast straight from the original, so no full-precision duplicate is ever held (a 7B float32 model
    on the GPU needs 14 GB more for a bfloat16 copy, not 28 + 14). Buffers keep their dtype (RoPE
    inverse frequencies stay float32, as from_pretrained(dtype=bfloat16) leaves them)."""
    memo = {}
    for parameter in model.parameters():
        if id(parameter) not in memo:
            value = parameter.detach().to(device=device, dtype=dtype if parameter.is_floating_point() else None)
            memo[id(parameter)] = nn.Parameter(value, requires_grad=False)
    for buffer in model.buffers():
        memo.setdefault(id(buffer), buffer.detach().to(device))
    return copy.deepcopy(model, memo)


def compile_blocks(model: nn.Module, engine: Engine, device: str) -> None:
    """Compile every decoder block of `model` in place (nn.Module.compile) when the engine compiles.

    The blocks share one forward code, and dynamo compiles one graph of it per layout of a block's
    modules (a mixed plan gives blocks their own group sizes: whole rows here, groups of 64 there);
    past torch._dynamo.config.recompile_limit graphs (8 by default) it runs the remaining blocks
    eagerly, at about half the speed. So the limit is raised to cover a graph per block, the
    teacher's and their no-grad variants. SmolLM2-135M with the 4.0 bpw plan's options shuffled over
    its linears, H100: 34,824 tok/s with the limit at 8 (18 graphs, the rest eager), 75,224 with it
    raised (60 graphs; their compiling takes about 160 s of the first step). benchmarks/train_speed.py
    --plan mixed; RESULTS.md."""
    if not engine.compiles(device):
        return
    import torch._dynamo

    from ..arch import arch_of

    blocks = model.get_submodule(arch_of(model.config.model_type).blocks)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(blocks) + 8)
    for block in blocks:
        block.compile(dynamic=False)


def uncompile_blocks(model: nn.Module) -> None:
    """Undo compile_blocks (a compiled block does not pickle or deep-copy cleanly)."""
    from ..arch import arch_of

    for block in model.get_submodule(arch_of(model.config.model_type).blocks):
        block._compiled_call_impl = None


class Clock:
    """The wall-time budget of a run: `planned(step)` is the number of steps the schedule runs to,
    shortened once the measured speed says `steps` will not fit in `max_minutes`."""

    def __init__(self, steps: int, max_minutes: float, start_step: int = 0):
        self.steps, self.limit = steps, max_minutes * 60.0
        self.start, self.start_step = time.perf_counter(), start_step
        self.warm: tuple[float, int] | None = None  # (time, step) after the warm-up steps
        self.shortened = False

    def planned(self, step: int) -> int:
        """Steps the schedule runs to, given that `step` steps are done now."""
        if not self.limit:
            return self.steps
        now = time.perf_counter()
        if self.warm is None and step - self.start_step >= WARMUP_STEPS:
            self.warm = (now, step)
        if self.warm is not None and step > self.warm[1]:
            rate = (step - self.warm[1]) / max(now - self.warm[0], 1e-9)   # steps per second, after warm-up
            fits = step + int(rate * max(self.limit - (now - self.start), 0.0))
            if fits < self.steps:
                self.steps, self.shortened = max(fits, step), True
        if now - self.start >= self.limit:
            self.steps, self.shortened = min(self.steps, step), self.shortened or step < self.steps
        return self.steps

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def cosine(fraction: float) -> float:
    """The learning-rate factor: cosine decay from 1 to 0.1 over the run."""
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(max(fraction, 0.0), 1.0)))


@dataclass
class TrainingConfig:
    """The engine's keys in a trained method's config (qat, distill): mixed into its dataclass."""

    precision: str = "auto"        # bf16 autocast + float32 masters ("auto": on CUDA), or fp32
    compile: bool | None = None    # compile the decoder blocks (None: on CUDA)
    micro_batch: int = 0           # windows per forward / backward, gradients accumulated (0: the batch)
    train_tokens: int = 0          # end-to-end token budget (0: `steps` decides)
    max_minutes: float = 0.0       # wall-time budget of the training loop (qat: end to end; 0: none)
    sharding: str = "auto"         # under torchrun: fsdp, ddp, or auto (fsdp on CUDA when ddp would not fit)

    def engine(self) -> Engine:
        return Engine(self.precision, self.compile, self.micro_batch, self.train_tokens, self.max_minutes,
                      self.sharding)

    def check_engine(self, batch: int) -> None:
        self.engine().validate(batch)


RECOVERY_SECONDS = 8 * 60  # what the default token budget on CUDA aims at (the time budget caps it)
RECOVERY_MINUTES = 10.0    # the default time budget of the end-to-end loop on CUDA
# tokens/s x parameters of qat end to end (bf16, compiled blocks, batch 32) measured on an H100 with
# SmolLM2-135M through `compress --recipe recipes/gptq-w3g64-qat-1min.yaml`: 113,180 tok/s
# (benchmarks/results/qat_engine_w3g64.json); a step's work grows with the parameters
TOKEN_RATE_X_PARAMS = 113_180 * 134_515_008
# the teacher's corpus: 3 M tokens for SmolLM2-135M (training/decode.StaticDecoder writes ~30 K tok/s
# at batch 1,024 on that H100: under 2 minutes with warm-up, once, then read from the cache), fewer for
# larger models; drawn at share RECOVERY_TEACHER_FRACTION. Of three settings at 3.0 bpw (share 0.5 +
# 1.5 M tokens, 0.9 + 1.5 M, 0.9 + 3 M) this one lost the least on held-out validation text and a
# second domain together (benchmarks/recovery_data.py, results/recovery_data.json)
CORPUS_TOKENS_X_PARAMS = 3_000_000 * 134_515_008
RECOVERY_TEACHER_FRACTION = 0.9


def recovery_defaults(params: int, device: str) -> dict[str, object]:
    """The engine keys of the recovery stage `compress --distill` appends, when the user set none:
    on CUDA batch 32 and a token budget the measured speed trains in about RECOVERY_SECONDS
    (54 M tokens for SmolLM2-135M), capped at RECOVERY_MINUTES of wall time, and a corpus the
    teacher writes of CORPUS_TOKENS_X_PARAMS / params tokens (3 M for SmolLM2-135M), drawn at share
    RECOVERY_TEACHER_FRACTION (0.9); on a CPU nothing (the stage's step count and share)."""
    if not str(device).startswith("cuda"):
        return {}
    params = max(params, 1)
    tokens = max(1_000_000, round(RECOVERY_SECONDS * TOKEN_RATE_X_PARAMS / params, -6))
    corpus = max(100_000, round(CORPUS_TOKENS_X_PARAMS / params, -5))
    return {"batch": 32, "train_tokens": int(tokens), "max_minutes": RECOVERY_MINUTES, "corpus_tokens": int(corpus),
            "teacher_fraction": RECOVERY_TEACHER_FRACTION}
