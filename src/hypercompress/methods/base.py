"""Base class of per-layer methods (the extension point of docs/DESIGN).

A per-layer method sees one linear layer at a time: `observe(name, x)` receives the layer's inputs
on calibration data (only for methods with `needs_calibration`), `compress(name, layer)` returns the
CompressedModule that replaces it.
"""

from __future__ import annotations

import abc
from typing import Callable, Iterator

import torch
from torch import nn

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
