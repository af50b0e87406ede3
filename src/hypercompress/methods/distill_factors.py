"""`distill`: train what earlier stages left trainable against the frozen teacher (KD recovery).

Trains, by distill.py's loss (KL on logits + per-block output matching + activation stability):
- the factors U, V of every LowRankLinear (SVD / ASVD stages);
- the scales of every QuantLinear (`train_scales`; the codes stay: PEQA, Kim et al. 2023);
- LoRA adapters (`lora_rank` > 0) put on the other compressed linears (layers/lora.py; they are
  stored, and counted, with the artifact); `relora_every` > 0 folds them into their base every
  that many steps and restarts them (ReLoRA, Lialin et al. 2023), so the stored adapter carries
  only what the last cycle learned;
- a compressed input embedding (`train_embedding`; a tied lm_head computes with it): a factorized
  one's B and its A's per-row scales and offsets (the codes stay), a quantized one's scales;
- the norms' weights (`train_norms`).
Data: the calibration windows, or windows the teacher writes itself from their first tokens
(`data: teacher`). The teacher is the original, or another model sharing the tokenizer
(apply.apply_recipe's distill_teacher, `--teacher`; training/teacher.py: KL alone). AdamW by default, Adafactor (`optimizer: adafactor`) to save memory. Everything
is trained in float32 and stored back in its stored dtype (float16), so the artifact's size does
not change unless adapters were added.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import MethodConfig, check
from ..training.distill import DistillSettings, distill, run_summary, train_norms
from ..training.engine import TrainingConfig
from ..training.teacher import written_vocabulary
from ..errors import UserError
from ..layers import LowRankLinear, QuantLinear, SparseLinear
from ..layers.lora import LoRALinear
from ..layers.low_rank_embedding import LowRankEmbedding
from ..modules import replace_module
from ..registry import register
from ..tracking import Tracker, check_tracking
from .base import WholeModelMethod


@dataclass
class DistillConfig(TrainingConfig, MethodConfig):
    steps: int = 100
    batch: int = 4
    lr: float = 1e-4
    local_weight: float = 0.1
    stability_weight: float = 0.01
    train_norms: bool = True
    train_scales: bool = True       # QuantLinear scales (codes fixed)
    train_embedding: bool = True    # a compressed input embedding: factor B, A's row scales/offsets (or
                                    # float16 A), a quantized table's scales (codes fixed)
    lora_rank: int = 0              # adapters on compressed linears other than low-rank ones
    relora_every: int = 0           # merge adapters into their base and restart them every N steps
    optimizer: str = "adamw"        # or "adafactor"
    data: str = "calib"             # or "teacher": windows sampled from the teacher
    compile: bool | None = False    # compiled blocks are measured for qat only (README, training engine)
    log_dir: str | None = None        # TensorBoard event files here (package tensorboard)
    wandb_project: str | None = None  # also log to this W&B project (package wandb; offline unless WANDB_MODE says)
    wandb_dir: str | None = None      # W&B run files here (default: log_dir, else the working directory)
    seed: int = 0

    def validate(self) -> None:
        for key in ("steps", "batch"):
            check(getattr(self, key) >= 1, f"{key}={getattr(self, key)}: must be >= 1")
        check(self.lr > 0, f"lr={self.lr}: must be positive")
        for key in ("local_weight", "stability_weight"):
            check(getattr(self, key) >= 0, f"{key}={getattr(self, key)}: a loss weight must be >= 0 (0 turns it off)")
        for key in ("lora_rank", "relora_every"):
            check(getattr(self, key) >= 0, f"{key}={getattr(self, key)}: must be >= 0 (0 turns it off)")
        check(self.relora_every == 0 or self.lora_rank > 0, "relora_every needs lora_rank > 0")
        check(self.optimizer in ("adamw", "adafactor"), f"optimizer={self.optimizer!r}: adamw or adafactor")
        check(self.data in ("calib", "teacher"), f"data={self.data!r}: calib or teacher")
        if self.sharding == "fsdp":  # the limits training/sharding.py states
            check(self.optimizer == "adamw", "sharding=fsdp cannot shard this run: optimizer adafactor is not "
                                             "sharded; use optimizer: adamw, or sharding: ddp")
            check(self.relora_every == 0, "sharding=fsdp cannot shard this run: relora_every merges adapters "
                                          "between steps; set relora_every=0, or sharding: ddp")
        self.check_engine(self.batch)
        check_tracking(self)


def _written_windows(teacher: nn.Module, calib: torch.Tensor, device: str, seed: int, progress,
                     vocab: int | None = None) -> torch.Tensor:
    """As many windows as `calib` holds, written by the teacher from openings of them (cached corpus;
    ids below `vocab` when given)."""
    from ..training.corpus import teacher_corpus

    return teacher_corpus(teacher, calib, tokens=calib.numel(), length=calib.shape[1], seed=seed, device=device,
                          batch=256 if str(device).startswith("cuda") else 16, vocab=vocab,
                          progress=(lambda d, t, note: progress(d, t, f"corpus | {note}")) if progress else None)


def _train(module: nn.Module, key: str, params: dict[str, nn.Parameter], name: str) -> None:
    """Turn buffer `key` of `module` into a float32 parameter registered in `params`."""
    param = nn.Parameter(getattr(module, key).float())
    del module._buffers[key]
    module.register_parameter(key, param)
    params[f"{name}.{key}"] = param


def _train_embedding(model: nn.Module, params: dict[str, nn.Parameter]) -> list[tuple[nn.Module, str]]:
    """The input embedding's trainable stored tensors turned into parameters (a tied lm_head
    computes with the same ones): (module, key) pairs."""
    embedding = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is embedding)
    if isinstance(embedding, LowRankEmbedding):
        keys = ["up"] + (["table"] if embedding.bits >= 16 else ["scale", "offset"])
    elif isinstance(embedding, QuantLinear):
        keys = ["scales"]
    else:
        return []
    for key in keys:
        _train(embedding, key, params, name)
    return [(embedding, key) for key in keys]


@register("distill", DistillConfig)
class Distill(WholeModelMethod):
    trains = True  # learns from every calibration window (apply.apply_recipe's train_calib)
    takes_distill_teacher = True  # the loss and written windows from another model (training/teacher.py)
    restored_from_modules = False  # it trains norms too, which a layer-wise checkpoint does not hold

    def apply(self, model, names, teacher, calib, *, device="cpu", progress=None, checkpoint_dir=None,
              resume=False) -> None:
        c = self.config
        # relora_every changes the stored bases, which checkpoints do not hold: such a run keeps no
        # checkpoint of its own, and a resume trains it again from the start (deterministic)
        saved = None if checkpoint_dir is None or c.relora_every else Path(checkpoint_dir) / "distill"
        torch.manual_seed(c.seed)
        generator = torch.Generator().manual_seed(c.seed)
        params: dict[str, nn.Parameter] = {}
        stored: list[tuple[nn.Module, str]] = []  # (module, key) turned into parameters
        adapters: list[LoRALinear] = []
        for name in names:
            module = model.get_submodule(name)
            if isinstance(module, LowRankLinear):
                keys = ["U", "V"]
            elif c.lora_rank and isinstance(module, (QuantLinear, SparseLinear)):
                if c.relora_every and not isinstance(module, QuantLinear):
                    raise UserError(f"relora_every merges adapters into quantized layers; {name} is "
                                    f"{module.kind}: set relora_every=0")
                module = LoRALinear.wrap(module, min(c.lora_rank, module.in_features, module.out_features), generator)
                replace_module(model, name, module)
                adapters.append(module)
                keys = ["A", "B"]
            else:
                keys = []
            if isinstance(getattr(module, "base", module), QuantLinear) and c.train_scales:
                target = getattr(module, "base", module)
                _train(target, "scales", params, f"{name}.base" if target is not module else name)
                stored.append((target, "scales"))
            for key in keys:
                _train(module, key, params, name)
                stored.append((module, key))
        if c.train_embedding:
            stored += _train_embedding(model, params)
        if c.train_norms:
            train_norms(model, params)
        if not stored:
            raise UserError("distill finds nothing to train among the selected modules: put an svd/asvd "
                            "or quantization stage before it (or set lora_rank for sparse layers)")
        teacher, external = self.training_teacher(teacher)
        model.to(device)
        teacher.to(device)
        windows = calib if c.data == "calib" else _written_windows(teacher, calib, device, c.seed, progress,
                                                                   written_vocabulary(model, teacher))
        settings = DistillSettings(c.steps, c.batch, c.lr, c.local_weight, c.stability_weight, c.seed,
                                   optimizer=c.optimizer, engine=c.engine(), match_blocks=not external)
        with Tracker.of("distill", c) as tracker:
            history = distill(model, teacher, windows, params, None, settings, device,
                    saved, resume, progress,
                    after_step=self._relora(adapters, generator) if c.relora_every else None, tracker=tracker)
        model.to("cpu")
        teacher.to("cpu")
        with torch.no_grad():
            for module, key in stored:
                value = getattr(module, key).detach().to(torch.float16)
                del module._parameters[key]
                module.register_buffer(key, value)
                if isinstance(module, LowRankEmbedding):
                    module._table = None  # decoded again from the trained tensors
        model.requires_grad_(False)
        self.training_report = {"end_to_end": run_summary(history, c.engine().steps(c.steps, c.batch * windows.shape[1]))}

    def _relora(self, adapters: list[LoRALinear], generator: torch.Generator):
        """Every relora_every steps: fold each adapter into its base, re-draw A, zero B, forget the
        adapter's optimizer state (the parameters stay the same objects)."""
        every = self.config.relora_every

        @torch.no_grad()
        def after_step(step: int, optimizer: torch.optim.Optimizer) -> None:
            if step % every or step == self.config.steps:
                return
            for adapter in adapters:
                adapter.merge_into_base()
                bound = 1 / adapter.in_features ** 0.5
                adapter.A.copy_((torch.rand(adapter.A.shape, generator=generator) * 2 - 1) * bound)
                for param in (adapter.A, adapter.B):
                    optimizer.state.pop(param, None)

        return after_step
