"""The three kinds of method (the extension points of docs/DESIGN.md).

- per layer (LayerwiseMethod): one linear layer at a time: `observe(name, x)` receives the layer's
  inputs on calibration data (only for methods with `needs_calibration`), `compress(name, layer)`
  returns the CompressedModule that replaces it; layerwise.run_layerwise drives it block by block.
- per block (BlockwiseMethod): one transformer block at a time, fitted so that it reproduces the
  original block's outputs from the inputs the compressed model gives it (Block-AP; the home of
  AWQ-style scale searches); its `walk` drives it.
- whole model (WholeModelMethod): trains or changes the whole model at once (distillation,
  hypernetworks, structural surgery).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .. import parallel
from ..arch import arch_of
from ..block_calls import BlockCalls, capture_block_inputs
from ..config import MethodConfig
from ..layers.base import CompressedModule


class LayerwiseMethod(abc.ABC):
    name: str = ""
    needs_calibration: bool = False
    default_targets: str = "linears"  # what a stage without targets selects (modules.select_linears)
    run_device: str = "cpu"  # the run's --device (apply.apply_recipe sets it): where a data-free method computes

    def __init__(self, config: MethodConfig):
        self.config = config

    def check_modules(self, modules: dict[str, nn.Module]) -> None:
        """Raise UserError when the config does not suit these modules (a stage's whole selection,
        before any is compressed), e.g. a rank past their break-even. Default: nothing to check."""

    def observe(self, name: str, x: torch.Tensor) -> None:
        """Accumulate statistics of the inputs x (..., in_features) of layer `name`.

        Methods without calibration (needs_calibration False) keep no statistics.
        """

    def observed_bytes(self, name: str, layer: nn.Module) -> int:
        """Bytes the statistics `observe` keeps for `layer` take until it is compressed (the
        layer-wise runner observes a block's linears in groups that fit a budget). Default 0."""
        return 0

    def statistics(self) -> list[dict] | None:
        """The accumulators `observe` fills: dicts {layer name: float64 tensor sum or int count},
        sums over the calibration tokens (not means), so that a data-parallel layer-wise run
        (layerwise.py under a launcher) can split the calibration batches between processes and
        add the processes' sums before compressing. None (the default): the method cannot split
        its batches, and every process observes all of them."""
        return None

    @abc.abstractmethod
    def compress(self, name: str, layer: nn.Module) -> CompressedModule:
        """Return the compressed replacement of `layer` (an nn.Linear or GPT-2 Conv1D)."""

    def compress_many(self, names: list[str], layer_of: Callable[[str], nn.Module]
                      ) -> Iterator[tuple[str, CompressedModule]]:
        """(name, replacement) for every name; layer_of(name) gives the layer. The layer-wise pass
        calls it with one block's observed linears, a data-free stage with all of its selection.
        A method that fits many layers at once (kan, gptq) overrides this; the order may differ."""
        for name in names:
            yield name, self.compress(name, layer_of(name))


class WholeModelMethod(abc.ABC):
    """A method that trains against the whole model (distillation, hypernetworks): `apply` replaces
    the selected block linears in place, using `teacher` (a frozen copy of the model as it was before
    the recipe's first stage) and the calibration windows."""

    name: str = ""
    needs_calibration: bool = True
    default_targets: str = "linears"  # what a stage without targets selects (modules.select_linears)
    whole_model: bool = True
    trains: bool = False  # a training stage: given every calibration window, not --calib-samples
    # resume: a later stage's layer-wise checkpoint restores every stored module; a method whose
    # result also lies elsewhere (trained norms) says False, one that is deterministic and cheap
    # (block surgery) says replay_on_resume = True and is run again before that restore
    restored_from_modules: bool = True
    replay_on_resume: bool = False
    # an exact change of basis (rotate): the model computes the same function after it, so the
    # teacher of later stages is taken after it (its hidden states in the student's basis)
    exact: bool = False
    # a trained method that can distil from another model sharing the tokenizer (training/teacher.py):
    # apply.apply_recipe sets distill_teacher before apply; None: the model's own original
    takes_distill_teacher: bool = False
    distill_teacher: nn.Module | None = None

    def __init__(self, config: MethodConfig):
        self.config = config

    def check_model(self, model: nn.Module) -> None:
        """Raise UserError (one line, the reason and the fix) for a model this method cannot handle
        whatever the data: compress calls it for every stage before any work (api.check_stages), so a
        refused run writes nothing. Default: every model is accepted."""

    def training_teacher(self, teacher: nn.Module) -> tuple[nn.Module, bool]:
        """(the model the end-to-end loss matches and whose corpus it trains on, whether that is
        another model than the original): distill_teacher when set, else `teacher`."""
        if self.distill_teacher is not None:
            return self.distill_teacher, True
        return teacher, False

    @abc.abstractmethod
    def apply(self, model: nn.Module, names: list[str], teacher: nn.Module, calib: torch.Tensor, *,
              device: str = "cpu", progress=None, checkpoint_dir=None, resume: bool = False) -> None:
        """Compress the modules `names` of `model` (in place); progress(done, total, note)."""


@dataclass
class BlockData:
    """What block `index` is fitted on: per calibration micro-batch, the (b, T, d) hidden states the
    compressed model feeds it (`inputs`: its earlier blocks already fitted) and the original block's
    outputs on the original's own inputs (`targets`), both on the CPU; `run(block, batch, hidden)`
    runs a block with that micro-batch's mask and rotary arguments."""

    index: int
    inputs: list[torch.Tensor]
    targets: list[torch.Tensor]
    calls: BlockCalls

    def run(self, block: nn.Module, batch: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.calls.run(block, self.index, batch, hidden)


class BlockwiseMethod(WholeModelMethod):
    """A method that fits one transformer block at a time against the original (Block-AP,
    methods/qat/block_ap.py; AWQ-style scale searches belong here too).

    `walk` captures both models' block inputs once, then for each block: the original block's
    outputs on its own inputs become the targets, `fit_block` changes the compressed block in place
    (blocks holding none of `names`, and blocks an earlier run finished, are only run), and the
    fitted block's outputs on its inputs are the next block's inputs, so each block also corrects the
    error the blocks before it left. Only the block being fitted sits on `device`. A subclass
    implements `fit_block`, and for resuming `restore` / `save_block`; `micro_batch` is the windows
    per forward."""

    micro_batch: int = 8

    @abc.abstractmethod
    def fit_block(self, block: nn.Module, data: BlockData) -> str:
        """Fit `block` (block data.index, on the run's device) in place; returns a note for the
        progress line (its output error, say)."""

    def restore(self, directory: Path, model: nn.Module) -> int:
        """Blocks an earlier run of this stage finished (their fitted tensors put back from
        `directory`); walk fits the blocks after them. Default: 0, nothing kept."""
        return 0

    def save_block(self, directory: Path, index: int, block: nn.Module) -> None:
        """Keep block `index`'s fitted tensors in `directory` (called on the main process after each
        block, so a killed run resumes at the next). Default: nothing kept."""

    def apply(self, model, names, teacher, calib, *, device="cpu", progress=None, checkpoint_dir=None,
              resume=False) -> None:
        self.walk(model, teacher, calib, names, device=device, progress=progress,
                  checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir), resume=resume)

    @torch.no_grad()
    def walk(self, student: nn.Module, teacher: nn.Module, windows: torch.Tensor, names: list[str], *,
             device: str = "cpu", progress: Callable[[int, int, str], None] | None = None,
             checkpoint_dir: Path | None = None, resume: bool = False) -> None:
        """Fit every block of `student` holding one of `names` against `teacher` on `windows` (N, T)
        token ids, in `micro_batch`-window forwards. progress(blocks done, blocks, note)."""
        blocks = arch_of(student.config.model_type).blocks
        student_blocks, teacher_blocks = student.get_submodule(blocks), teacher.get_submodule(blocks)
        windows = windows.to(next(teacher.parameters()).device)  # where the models are (the runner keeps them on CPU)
        target_in, calls = capture_block_inputs(teacher, windows, self.micro_batch)
        student_in, _ = capture_block_inputs(student, windows, self.micro_batch)
        calls = calls.to(device)
        done = self.restore(checkpoint_dir, student) if resume and checkpoint_dir is not None else 0
        note = "resumed" if done else "run only (nothing to fit)"  # until a block is fitted
        for index in range(len(student_blocks)):
            homes = [next(b.parameters()).device for b in (teacher_blocks[index], student_blocks[index])]
            teacher_block, student_block = teacher_blocks[index].to(device), student_blocks[index].to(device)
            target_out = [calls.run(teacher_block, index, b, h.to(device)).cpu() for b, h in enumerate(target_in)]
            if index >= done and any(n.startswith(f"{blocks}.{index}.") for n in names):
                with torch.enable_grad():
                    note = self.fit_block(student_block, BlockData(index, student_in, target_out, calls))
                if checkpoint_dir is not None and parallel.is_main():
                    self.save_block(checkpoint_dir, index, student_block)
            student_in = [calls.run(student_block, index, b, h.to(device)).cpu() for b, h in enumerate(student_in)]
            target_in = target_out
            teacher_blocks[index].to(homes[0])  # back where it was (all on the device when the caller moved the model)
            student_blocks[index].to(homes[1])
            if progress and parallel.is_main():
                progress(index + 1, len(student_blocks), note)
