"""The registered `hypernet` method: build the generator, warm-start it, distil it, install it.

1. Targets: every block linear (L layers x T types); each type has one shape across layers.
2. Warm start (optional): z[l, t] = SetEncoder(patches of W[l, t] / rms) and the generator are fitted
   jointly to the weights (generate mode) or to the residual W - base (residual mode) by normalised
   MSE (head=dit: plus the denoising loss on the patches of the target's rank-r SVD factors); the
   encoder's z become the stored embeddings and the encoder is dropped (not stored).
3. Distillation (distill.py): KL on logits + per-block output matching + activation stability,
   with the weights regenerated (with autograd) before every forward.
4. The generator is rounded to float16 (its storage; with value_bits 8 / 4 its matrices to per-row
   codes) and every target becomes a GeneratedLinear that
   reads its weight from the generator at the model root ("hypernet"): decompress on load.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...arch import arch_of, block_linear_names
from ...training.distill import DistillSettings, distill
from ...training.engine import Engine
from ...errors import UserError
from ...layers.base import CompressedModule, linear_bias, linear_weight
from ...modules import replace_module
from ...registry import register
from ...tracking import Tracker, learning_rates
from ..base import WholeModelMethod
from .config import HypernetConfig
from ...layers.hypernet import GeneratedLinear, HyperGenerator
from .patches import to_patches
from .set_encoder import SetEncoder

ROOT_NAME = "hypernet"
ENCODER_PATCHES = 128  # patches per matrix the encoder reads per step (a random subset: it is a set)


@register("hypernet", HypernetConfig)
class Hypernet(WholeModelMethod):
    trains = True  # learns from every calibration window (apply.apply_recipe's train_calib)
    encoder: SetEncoder | None = None  # after apply: the warm start's encoder (kept in memory only)
    history: list[dict[str, float]] = []  # after apply: the distillation's steps (distill.distill's history)

    def check_model(self, model) -> None:
        if arch_of(model.config.model_type).experts:
            raise UserError(f"hypernet: {model.config.model_type} is a mixture of experts, whose blocks hold many "
                            "linears of one type (the generator makes one per type and block); compress its "
                            "experts with rtn, gptq or a pruning method instead")

    def apply(self, model, names, teacher, calib, *, device="cpu", progress=None, checkpoint_dir=None,
              resume=False) -> None:
        c = self.config
        torch.manual_seed(c.seed)
        grid = _grid(model, names)
        types = len(grid[0])
        shapes = [_shape(model.get_submodule(grid[0][t])) for t in range(types)]
        for row in grid:
            for t, name in enumerate(row):
                if _shape(model.get_submodule(name)) != shapes[t]:
                    raise UserError(f"{name}: shape differs from layer 0's; hypernet needs one shape per type")
        limit = min(min(shape) for shape in shapes)
        if c.rank > limit:
            raise UserError(f"hypernet: rank={c.rank} is past the smallest side of the selected layers ({limit}): "
                            f"a rank-{limit} product already spans every matrix; set rank to 1..{limit}")
        bases = {}
        if c.mode == "residual":
            for name in names:
                module = model.get_submodule(name)
                if not isinstance(module, CompressedModule):
                    raise UserError(f"hypernet mode=residual: {name} is not compressed by an earlier stage; "
                                    "put e.g. a gptq stage (bits=2) before it in the recipe")
                bases[name] = module
        generator = HyperGenerator(len(grid), shapes, c.rank, c.d_z, c.d_hidden, c.block, c.backbone,
                                   c.value_bits, c.head, c.dit_depth, c.dit_heads, c.dit_steps).to(device)
        generator.tbptt = c.tbptt
        with Tracker.of("hypernet", c) as tracker:  # warm start under hypernet/warm, distillation under hypernet
            if c.warm_steps:  # the targets (float32 copies of a bfloat16 teacher's weights) live only here
                targets = [[_target(teacher, name, bases.get(name)) for name in row] for row in grid]
                self.encoder = _warm_start(generator, targets, c, device, progress, tracker)
                del targets
            _install(model, generator, grid, shapes, bases)
            self._distill(model, teacher, calib, generator, device, progress, checkpoint_dir, resume, tracker)

    def _distill(self, model, teacher, calib, generator, device, progress, checkpoint_dir, resume, tracker) -> None:
        c = self.config
        model.to(device)
        teacher.to(device)
        if c.grad_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        params = {n: p for n, p in generator.named_parameters()}
        # bf16 autocast on CUDA (the generator itself runs in float32); blocks not compiled: a generated
        # layer's weights change every step, which the engine's compiled path was not measured with
        settings = DistillSettings(c.steps, c.batch, c.lr, c.local_weight, c.stability_weight, c.seed,
                                   engine=Engine(compile=False))
        refresh = generator.install_lazy if c.checkpoint_generator else lambda: generator.install(generator())
        self.history = distill(model, teacher, calib, params, refresh, settings, device,
                None if checkpoint_dir is None else Path(checkpoint_dir) / "hypernet", resume,
                progress=progress, tracker=tracker)
        model.eval()
        if c.grad_checkpointing:
            model.gradient_checkpointing_disable()
        generator.requires_grad_(False)
        generator.tbptt = 0
        generator.half()       # the stored precision; weights are regenerated from exactly these
        generator.quantize_values()
        model.to("cpu")
        teacher.to("cpu")
        generator.bind(model)  # regenerate from the stored float16 generator (what load will do)


def _install(model: nn.Module, generator: HyperGenerator, grid, shapes, bases) -> None:
    """Every target linear [l][t] becomes a GeneratedLinear (its bias kept; residual mode: its
    base inside it); the generator goes to the model root and is bound to them."""
    for l, row in enumerate(grid):
        for t, name in enumerate(row):
            old = model.get_submodule(name)
            base = bases.get(name)
            layer = GeneratedLinear(shapes[t][1], shapes[t][0], l, t,
                                    base is None and linear_bias(old) is not None,
                                    None if base is None else {"kind": base.kind, "layout": base.layout()})
            if base is not None:
                layer.base = base  # its bias, if any, stays in it
            if layer.bias is not None:
                layer.bias.copy_(linear_bias(old))
            replace_module(model, name, layer)
    replace_module(model, ROOT_NAME, generator)
    generator.bind(model)


def _shape(module: nn.Module) -> list[int]:
    weight = module.dense_weight() if isinstance(module, CompressedModule) else linear_weight(module)
    return list(weight.shape)


def block_linear_grid(model: nn.Module) -> list[list[str]]:
    """The block linears' full names as [layer][type] (block_linear_names, one row per block)."""
    names, types = block_linear_names(model), len(arch_of(model.config.model_type).linears)
    return [names[i:i + types] for i in range(0, len(names), types)]


def _grid(model: nn.Module, names: list[str]) -> list[list[str]]:
    """names -> [layer][type] full names; every block must hold every type."""
    grid = block_linear_grid(model)
    if sorted(names) != sorted(n for row in grid for n in row):
        raise UserError("hypernet generates every block linear of the model; leave targets/ignore unset")
    return grid


def _target(teacher: nn.Module, name: str, base) -> torch.Tensor:
    weight = linear_weight(teacher.get_submodule(name))
    return weight if base is None else weight - base.dense_weight()


def _warm_start(generator: HyperGenerator, targets, c: HypernetConfig, device: str, progress,
                tracker: Tracker | None = None):
    """Fit the generated weights to `targets` [l][t] (normalised MSE); z from the Set Transformer.
    Returns the trained encoder (or None): not stored, but it maps other checkpoints to latents.
    Each step's loss, weight_error (and denoising, head=dit), weights_per_second (generated
    weight entries per second) and lr go to `tracker` under "hypernet/warm"."""
    layers, types = len(targets), len(targets[0])
    scale = [[targets[l][t].pow(2).mean().sqrt().clamp_min(1e-8) for t in range(types)] for l in range(layers)]
    with torch.no_grad():
        generator.gain.copy_(torch.tensor([[s.item() for s in row] for row in scale]) * 4.0)
    tokens = _factor_tokens(generator, targets, device) if generator.head == "dit" else None
    encoder = patches = None
    if c.encoder_init:
        encoder = SetEncoder(c.block * c.block, c.d_z).to(device)
        patches = [[to_patches(targets[l][t] / scale[l][t], c.block) for t in range(types)] for l in range(layers)]
    params = list(generator.parameters()) + (list(encoder.parameters()) if encoder else [])
    optimizer = torch.optim.AdamW(params, lr=c.lr)
    wanted = [torch.stack([targets[l][t] for l in range(layers)]).to(device) for t in range(types)]
    norms = [w.pow(2).mean((1, 2)) for w in wanted]
    rng = torch.Generator().manual_seed(c.seed)
    entries = sum(w.numel() for w in wanted)
    for step in range(c.warm_steps):
        tick = time.perf_counter()
        z = _encode(encoder, patches, rng, device) if encoder else None
        error = _weight_error(generator, z, wanted, norms, c.checkpoint_generator)
        loss = error
        if tokens is not None:  # the DiT learns to denoise, and its K-step samples to match the weights
            denoising = generator.denoising_loss(tokens, rng, z)
            loss = error + denoising
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if tracker is not None:
            extra = {"denoising": denoising.item()} if tokens is not None else {}
            tracker.log({"loss": loss.item(), "weight_error": error.item(), **extra, **learning_rates(optimizer),
                         "weights_per_second": entries / (time.perf_counter() - tick)}, step + 1,
                        prefix=f"{tracker.prefix}/warm")
        if progress:
            what = f" + denoising {denoising.item():.4f}" if tokens is not None else ""
            progress(step + 1, c.warm_steps, f"warm start | weight error {error.item():.4f}{what}")
    if encoder is not None:
        with torch.no_grad():
            generator.z.copy_(_encode(encoder, patches, rng, device))
        encoder.requires_grad_(False)
    return encoder


def _weight_error(generator: HyperGenerator, z, wanted: list[torch.Tensor], norms: list[torch.Tensor],
                  checkpointed: bool) -> torch.Tensor:
    """Mean over types and layers of ||W[l, t] - target||^2 / ||target||^2 (per entry); wanted[t]
    (L, d_out, d_in), norms[t] (L,). checkpointed: each W[l, t] made under torch.utils.checkpoint
    and dropped at once (made again in backward), instead of all L x T held with their graphs."""
    if not checkpointed:
        made = generator(z)
        return sum(((m - w).pow(2).mean((1, 2)) / n).mean() for m, w, n in zip(made, wanted, norms)) / len(wanted)
    context = generator.contexts(z)

    def one(context: torch.Tensor, l: int, t: int) -> torch.Tensor:
        return (generator.layer_weight(context, l, t) - wanted[t][l]).pow(2).mean() / norms[t][l]

    layers = generator.num_layers
    return sum(checkpoint(one, context, l, t, use_reentrant=False)
               for t in range(len(wanted)) for l in range(layers)) / (layers * len(wanted))


@torch.no_grad()
def _factor_tokens(generator: HyperGenerator, targets, device: str) -> list[torch.Tensor]:
    """DiT targets: per type, the (L, rows + cols, B r) patch tokens of the rank-r SVD factors of
    every target, each factor scaled to unit RMS (the scales go into the gains: W_r = gain U V / sqrt(r))."""
    r, out = generator.rank, []
    for t in range(len(targets[0])):
        stacked = torch.stack([row[t] for row in targets]).to(device)             # (L, d_out, d_in)
        u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
        u, vh = u[..., :r] * s[:, None, :r].sqrt(), s[:, :r, None].sqrt() * vh[:, :r]
        u, vh = F.pad(u, (0, r - u.shape[-1])), F.pad(vh, (0, 0, 0, r - vh.shape[-2]))
        a, b = u.pow(2).mean((1, 2)).sqrt().clamp_min(1e-8), vh.pow(2).mean((1, 2)).sqrt().clamp_min(1e-8)
        generator.gain[:, t] = (a * b * r ** 0.5).to(generator.gain)
        out.append(generator.to_tokens(u / a[:, None, None], vh / b[:, None, None]))
    return out


@torch.no_grad()
def encode_weights(encoder: SetEncoder, weights: list[list[torch.Tensor]], block: int, seed: int = 0) -> torch.Tensor:
    """Latents (L, T, d_z) of a checkpoint's block weights [l][t] (each scaled by its RMS, as in
    training), from the same random patch subsets for a given seed (so two checkpoints compare)."""
    device = next(encoder.parameters()).device
    patches = [[to_patches(w / w.pow(2).mean().sqrt().clamp_min(1e-8), block) for w in row] for row in weights]
    return _encode(encoder, patches, torch.Generator().manual_seed(seed), device)


def _encode(encoder: SetEncoder, patches, rng: torch.Generator, device: str) -> torch.Tensor:
    """(L, T, d_z) latents from a random subset of each matrix's patches (coords scaled to [0, 1])."""
    tokens, coords = [], []
    for row in patches:
        for tok, coord, grid in row:
            pick = torch.randperm(tok.shape[0], generator=rng)[:ENCODER_PATCHES]
            tokens.append(tok[pick])
            span = torch.tensor([max(grid.row_blocks - 1, 1), max(grid.col_blocks - 1, 1)])
            coords.append(coord[pick] / span)
    count = min(t.shape[0] for t in tokens)
    tokens = torch.stack([t[:count] for t in tokens]).to(device)
    coords = torch.stack([c[:count] for c in coords]).to(device)
    return encoder(tokens, coords).reshape(len(patches), len(patches[0]), -1)
