"""Configuration of the Solomonoff hypernetwork method (defaults: minutes on a tiny model, CPU)."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import MethodConfig, check
from ...tracking import check_tracking
from ...layers.hypernet.backbone import BACKBONES, TBPTT_MAMBA
from ...layers.hypernet.generator import HEADS


@dataclass
class HypernetConfig(MethodConfig):
    mode: str = "generate"          # generate: W = G(l, t); residual: W = base + G(l, t) (base: an earlier stage)
    rank: int = 8                   # rank r of the generated factors U (d_out, r), V (r, d_in)
    d_z: int = 16                   # size of each layer-and-type embedding z[l, t]
    d_hidden: int = 64              # backbone state and context size
    block: int = 16                 # rows / columns generated per coordinate (patch) step
    backbone: str = "gru"           # gru | ssm (selective state space, plain PyTorch) | mamba (mamba-ssm, CUDA)
    head: str = "mlp"               # mlp (coordinate MLP heads) | dit (diffusion transformer over factor patches)
    dit_depth: int = 2              # DiT blocks (head=dit)
    dit_heads: int = 4              # attention heads per DiT block (must divide d_hidden)
    dit_steps: int = 4              # deterministic DDIM steps, in training and on load
    value_bits: int = 16            # storage of the generator's matrices: 16 (float16), 8 or 4 (per-row codes)
    encoder_init: bool = True       # initialise z with the Set Transformer encoder of each weight's patches
    warm_steps: int = 100           # weight-reconstruction warm start steps (0: none)
    steps: int = 100                # distillation steps (KL on logits + local + stability losses)
    batch: int = 4                  # calibration windows per distillation step
    lr: float = 2e-3                # AdamW learning rate (cosine decay to 10%)
    local_weight: float = 0.1       # per-layer output matching (normalised MSE of block outputs)
    stability_weight: float = 0.01  # activation stability: (log of student/teacher output RMS)^2
    grad_checkpointing: bool = False  # recompute the model's blocks in backward (HF; memory for compute)
    checkpoint_generator: bool = False  # make each W[l, t] inside its layer's forward, again in backward (no
                                        # generated weight held across the forward; Chen et al. 2016)
    tbptt: int = 0                  # truncated backprop through depth: the backbone's state detached every
                                    # tbptt layers (0: full depth; Williams & Peng 1990); not with mamba
    log_dir: str | None = None        # TensorBoard event files here (package tensorboard)
    wandb_project: str | None = None  # also log to this W&B project (package wandb; offline unless WANDB_MODE says)
    wandb_dir: str | None = None      # W&B run files here (default: log_dir, else the working directory)
    seed: int = 0

    def validate(self) -> None:
        check(self.mode in ("generate", "residual"), f"mode={self.mode!r}: must be generate or residual")
        check(self.backbone in BACKBONES, f"backbone={self.backbone!r}: must be one of {', '.join(BACKBONES)}")
        for key in ("rank", "d_z", "d_hidden", "block", "batch"):
            check(getattr(self, key) > 0, f"{key}={getattr(self, key)}: must be positive")
        for key in ("warm_steps", "steps"):
            check(getattr(self, key) >= 0, f"{key}={getattr(self, key)}: must be >= 0")
        check(self.lr > 0, f"lr={self.lr}: must be positive")
        for key in ("local_weight", "stability_weight"):
            check(getattr(self, key) >= 0, f"{key}={getattr(self, key)}: a loss weight must be >= 0 (0 turns it off)")
        check(self.head in HEADS, f"head={self.head!r}: must be one of {', '.join(HEADS)}")
        for key in ("dit_depth", "dit_heads", "dit_steps"):
            check(getattr(self, key) > 0, f"{key}={getattr(self, key)}: must be positive")
        check(self.head != "dit" or self.d_hidden % self.dit_heads == 0,
              f"d_hidden={self.d_hidden} must be a multiple of dit_heads={self.dit_heads}")
        check(self.value_bits in (4, 8, 16), f"value_bits={self.value_bits}: must be 4, 8 or 16")
        check(self.tbptt >= 0, f"tbptt={self.tbptt}: must be >= 0 (0: full backpropagation through depth)")
        check(self.tbptt == 0 or self.backbone != "mamba", f"tbptt={self.tbptt} with backbone=mamba: {TBPTT_MAMBA}")
        check_tracking(self)
