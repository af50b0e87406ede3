"""`qat`: quantization-aware distillation; the weights themselves learn to sit well on their grid.

Every selected linear becomes a FakeQuantLinear (fake_quant.py): from the codes an earlier stage
stored (a GPTQ or RTN stage, or the planner's mixed plan: each module keeps its own bits and group),
or, for a dense linear, from RTN's min-max grid with this config's bits / group_size. A quantized
input embedding (and the lm_head tied to it) is trained the same way, a dense one too when
`embedding_bits` > 0, and so is an untied lm_head that an earlier stage quantized. Then, as EfficientQAT (Chen et al. 2024):
1. Block-AP (block_ap.py): block by block, latent weights and scales trained to reproduce the
   original block's output (`block_steps` per block);
2. end to end: latent weights, scales, the embedding and the norms trained on distill.py's loss
   (KL to the original's next-token distribution + per-block hidden-state matching), `steps` steps.
Data: the calibration windows plus a corpus the original model writes itself from openings of
them (training/corpus.py: `corpus_tokens`, deduplicated, cached on disk under a content hash and
reused by later runs); training draws a written window with probability `teacher_fraction`, so
the recovery does not fit the calibration text's domain alone. Block-AP trains on `block_windows`
of that mix. Precision, compilation, micro-batches and the token / time budgets are the training
engine's keys (training/engine.py). The result is stored as the usual
QuantLinear / QuantEmbedding codes (the same bytes as RTN or GPTQ at these settings), so every
exporter and kernel applies. Checkpoints after each block and during the end-to-end phase; a
killed run resumes. Runs on --device cuda and under torchrun (parallel.py).
Another teacher (apply.apply_recipe's distill_teacher, `--teacher`; training/teacher.py) writes the corpus
and is matched end to end by KL alone; Block-AP still rebuilds the blocks of the original.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...config import MethodConfig, check
from ...training.distill import DistillSettings, distill, run_summary, train_norms
from ...training.engine import TrainingConfig
from ...training.teacher import written_vocabulary
from ...errors import UserError
from ...layers.quant_embedding import QuantEmbedding, TiedHead
from ...layers.quant_linear import QuantLinear, resolve_group_size
from ...layers.base import LINEAR_TYPES, CompressedModule, linear_weight
from ...modules import carry_embedding_scale
from ...registry import register
from ...tracking import Tracker, check_tracking
from ..base import WholeModelMethod
from ..rtn import smallest_useful_group
from .block_ap import block_ap
from .fake_quant import FakeQuantLinear, FakeTiedHead


@dataclass
class QatConfig(TrainingConfig, MethodConfig):
    bits: int = 4                 # grid of dense linears (compressed ones keep their own)
    group_size: int = 64          # input columns per scale; -1: one group per row
    symmetric: bool = False
    zero_point: str = "int"       # 'int' (b-bit integer) or 'float' (float16 minimum, trained too)
    embedding_bits: int = 0       # quantize a dense input embedding (rows grouped) to this; 0: leave it
    block_steps: int = 100        # Block-AP steps per block (0: skip)
    block_lr: float = 2e-4        # Block-AP learning rate of the latent weights (benchmarks/qat_lr.py: the
                                  # lowest held-out block error of 1e-5..5e-4, tied with 5e-4)
    steps: int = 400              # end-to-end steps (0: skip); the frontier rows' setting
    lr: float = 1.5e-4            # end-to-end learning rate of the latent weights (benchmarks/frontier.py on
                                  # SmolLM2: of 2e-5, 5e-5, 1.5e-4 the lowest held-out validation and
                                  # second-domain loss at 3 and 4 bits)
    scale_lr_factor: float = 5.0  # scales and zeros learn this many times faster than weights
    batch: int = 8                # windows per step (both phases); the frontier rows' setting
    local_weight: float = 0.1     # end to end: per-block hidden-state matching
    train_norms: bool = True      # end to end: the norms' weights too (stored in float16 anyway)
    teacher_fraction: float = 0.5  # share of teacher-written windows in what training draws
    corpus_tokens: int = 0        # tokens the teacher writes (0: default_corpus_tokens: the calibration windows'
                                  # count x share / (1 - share), at most what training draws)
    corpus_cache: str | None = None  # folder of cached corpora (default ~/.cache/hypercompress/corpus or
                                     # $HYPERCOMPRESS_CACHE/corpus), or one .safetensors corpus file
    corpus_batch: int = 0         # sequences the teacher writes at once (0: decode.default_batch: 16 on a
                                  # CPU, on CUDA up to 1024 as the free memory allows)
    block_windows: int = 128      # windows Block-AP trains each block on (drawn from the mix)
    tf32: bool = True             # on CUDA, train with TF32 matmuls (tensor cores; 10-bit mantissa inputs,
                                  # float32 accumulation); the caller's setting is restored afterwards
    log_dir: str | None = None        # TensorBoard event files here (package tensorboard)
    wandb_project: str | None = None  # also log to this W&B project (package wandb; offline unless WANDB_MODE says)
    wandb_dir: str | None = None      # W&B run files here (default: log_dir, else the working directory)
    seed: int = 0

    def validate(self) -> None:
        check(2 <= self.bits <= 8, f"bits={self.bits}: must be between 2 and 8")
        check(self.embedding_bits == 0 or 2 <= self.embedding_bits <= 8,
              f"embedding_bits={self.embedding_bits}: 0 (leave the embedding) or 2..8")
        check(self.group_size == -1 or self.group_size >= smallest_useful_group(self.bits, self.symmetric,
                                                                                self.zero_point),
              f"group_size={self.group_size}: too small to store less than float16 (or -1 for rows)")
        check(self.zero_point in ("int", "float"), f"zero_point={self.zero_point!r}: must be 'int' or 'float'")
        for key in ("block_steps", "steps"):
            check(getattr(self, key) >= 0, f"{key}={getattr(self, key)}: must be >= 0 (0 skips that phase)")
        check(self.block_steps + self.steps > 0, "block_steps and steps are both 0: qat would train nothing")
        check(self.batch >= 1, f"batch={self.batch}: must be >= 1")
        for key in ("block_lr", "lr", "scale_lr_factor"):
            check(getattr(self, key) > 0, f"{key}={getattr(self, key)}: must be positive")
        check(self.local_weight >= 0, f"local_weight={self.local_weight}: must be >= 0 (0 turns it off)")
        check(0 <= self.teacher_fraction < 1, f"teacher_fraction={self.teacher_fraction}: must be in [0, 1)")
        for key in ("corpus_tokens", "corpus_batch"):
            check(getattr(self, key) >= 0, f"{key}={getattr(self, key)}: must be >= 1 (or 0: the default)")
        check(self.block_windows >= 1, f"block_windows={self.block_windows}: must be >= 1")
        self.check_engine(self.batch)
        check_tracking(self)


def training_data(teacher: nn.Module, calib: torch.Tensor, c: "QatConfig", device: str,
                  progress=None, vocab: int | None = None) -> tuple[torch.Tensor, tuple[int, float] | None]:
    """(windows, mix): the N calibration windows followed by the corpus the teacher writes from
    openings of them (training/corpus.py: `corpus_tokens` tokens, default `default_corpus_tokens`;
    temperature 1, top-p 1; ids below `vocab` when given; cached under its content hash in
    `corpus_cache`), and the share at which training draws the written ones (None: no corpus)."""
    if c.teacher_fraction == 0:
        return calib, None
    from ...training.corpus import teacher_corpus

    tokens = c.corpus_tokens or default_corpus_tokens(calib, c)
    cache = c.corpus_cache
    explicit = cache is not None and cache.endswith(".safetensors")
    corpus = teacher_corpus(teacher, calib, tokens=max(tokens, calib.shape[1]), length=calib.shape[1], seed=c.seed,
                            batch=c.corpus_batch or None,
                            cache_dir=None if explicit else cache, cache_file=cache if explicit else None,
                            device=device, progress=progress, vocab=vocab)
    return torch.cat([calib, corpus]), (calib.shape[0], c.teacher_fraction)


def default_corpus_tokens(calib: torch.Tensor, c: "QatConfig") -> int:
    """Tokens the teacher writes when `corpus_tokens` is 0: as many windows as make written text
    `teacher_fraction` of the calibration windows' count, but never more than training can draw
    (each of its steps x batch windows, and Block-AP's `block_windows`, is a written one with that
    probability): 3 steps of 8 windows need 12 written windows, not one per calibration window."""
    share, length = c.teacher_fraction, calib.shape[1]
    balanced = round(calib.shape[0] * share / (1 - share))
    drawn = (c.engine().steps(c.steps, c.batch * length) * c.batch if c.steps else 0) \
        + (c.block_windows if c.block_steps else 0)
    return max(1, min(balanced, math.ceil(drawn * share))) * length


def block_windows(windows: torch.Tensor, mix: tuple[int, float] | None, count: int, seed: int) -> torch.Tensor:
    """Block-AP's windows: `count` rows drawn from the training mix at its share (all rows when
    there are fewer): every block's inputs are held for them, so their number is bounded."""
    if windows.shape[0] <= count:
        return windows
    from ...training.corpus import mixed_picks

    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(windows.shape[0], generator=generator)[:count] if mix is None else \
        mixed_picks(count, mix[0], windows.shape[0] - mix[0], mix[1], generator)
    return windows[picks]


@register("qat", QatConfig)
class Qat(WholeModelMethod):
    trains = True  # learns from every calibration window (apply.apply_recipe's train_calib)
    takes_distill_teacher = True  # end to end and the corpus from another model (Block-AP: the original)
    restored_from_modules = False  # it trains norms too, which a layer-wise checkpoint does not hold

    def apply(self, model, names, teacher, calib, *, device="cpu", progress=None, checkpoint_dir=None,
              resume=False) -> None:
        c = self.config
        self.history: list[dict[str, float]] = []
        torch.manual_seed(c.seed)
        fakes = self._fake_quantize(model, names)
        saved = None if checkpoint_dir is None else Path(checkpoint_dir)
        target, external = self.training_teacher(teacher)
        model.to(device)
        teacher.to(device)
        target.to(device)
        tracker = Tracker.of("qat", c)  # Block-AP under qat/block_ap, end to end under qat
        precision = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = c.tf32 and str(device).startswith("cuda")
        try:
            tick = time.perf_counter()
            windows, mix = training_data(target, calib, c, device,  # seeded and cached: a resume reads the same
                                         (lambda d, t, note: progress(d, t, f"corpus | {note}")) if progress else None,
                                         written_vocabulary(model, target))
            self._corpus_seconds, tick = time.perf_counter() - tick, time.perf_counter()
            if c.block_steps:
                block_ap(model, teacher, block_windows(windows, mix, c.block_windows, c.seed),
                         {n: f for n, f in fakes.items() if not f.embedding},
                         steps=c.block_steps, batch=c.batch, lr=c.block_lr, scale_lr=c.block_lr * c.scale_lr_factor,
                         seed=c.seed, device=device, checkpoint_dir=None if saved is None else saved / "blocks",
                         resume=resume,
                         progress=(lambda d, t, note: progress(d, t, f"block-ap | {note}")) if progress else None,
                         tracker=tracker, autocast=c.engine().autocast(device), micro_batch=c.micro_batch)
            self._block_ap_seconds = time.perf_counter() - tick
            if c.steps:
                self._end_to_end(model, target, windows, mix, fakes, device, saved, resume, progress, tracker,
                                 match_blocks=not external)
        finally:
            tracker.close()
            torch.backends.cuda.matmul.allow_tf32 = precision  # as the caller had it (evaluation in float32)
            model.to("cpu")
            teacher.to("cpu")
            target.to("cpu")
        self._store(model, fakes)
        asked = c.engine().steps(c.steps, c.batch * windows.shape[1])
        self.training_report = {"end_to_end": run_summary(self.history, asked) if c.steps else None,
                                "corpus_seconds": round(self._corpus_seconds, 2),
                                "block_ap_seconds": round(self._block_ap_seconds, 2),
                                "calibration_windows": int(calib.shape[0]),
                                "corpus_windows": int(windows.shape[0] - calib.shape[0]),
                                "corpus_share": mix[1] if mix else 0.0, "window_tokens": int(windows.shape[1]),
                                "teacher": "another model" if external else "the original"}

    def _fake_quantize(self, model: nn.Module, names: list[str]) -> dict[str, FakeQuantLinear]:
        """Selected linears (and the input embedding, see the module docstring) -> FakeQuantLinear."""
        c = self.config
        embedding = model.get_input_embeddings()
        embed_name = next(n for n, m in model.named_modules() if m is embedding)
        head = model.get_output_embeddings()
        tied = isinstance(head, TiedHead) or (isinstance(embedding, nn.Embedding)
                                              and getattr(head, "weight", None) is embedding.weight)
        chosen = [n for n in names if n != embed_name]
        if isinstance(embedding, QuantEmbedding) or (c.embedding_bits and isinstance(embedding, nn.Embedding)):
            chosen.append(embed_name)
        head_name = next((n for n, m in model.named_modules() if m is head), None)
        if isinstance(head, QuantLinear) and head_name not in chosen:  # an untied head an earlier stage quantized
            chosen.append(head_name)
        fakes: dict[str, FakeQuantLinear] = {}
        for name in chosen:
            module = model.get_submodule(name)
            if isinstance(module, QuantLinear):  # QuantEmbedding included
                fake = FakeQuantLinear.from_stored(module)
            elif isinstance(module, nn.Embedding):
                group = resolve_group_size(name, module.weight.shape[1], -1)
                fake = FakeQuantLinear.from_dense(module, c.embedding_bits, group)
            elif isinstance(module, LINEAR_TYPES) and not isinstance(module, CompressedModule):
                group = resolve_group_size(name, linear_weight(module).shape[1], c.group_size)
                fake = FakeQuantLinear.from_dense(module, c.bits, group, c.symmetric, c.zero_point)
            else:
                raise UserError(f"qat trains quantized or dense linears; {name} is "
                                f"{getattr(module, 'kind', type(module).__name__)}: leave it out of the targets")
            _put(model, name, fake)
            fakes[name] = fake
        if not fakes:
            raise UserError("qat selects no linear to train; check its targets")
        if embed_name in fakes and tied:
            _put(model, head_name, FakeTiedHead(fakes[embed_name]))
        return fakes

    def _end_to_end(self, model, teacher, windows, mix, fakes, device, saved, resume, progress,
                    tracker: Tracker | None = None, match_blocks: bool = True) -> None:
        c = self.config
        params: dict[str, nn.Parameter] = {}
        for name, fake in fakes.items():
            for key, param in fake.named_parameters():
                params[f"{name}.{key}"] = param
        if c.train_norms:
            train_norms(model, params)
        engine = c.engine()  # max_minutes bounds this phase's training loop (corpus and Block-AP are timed apart)
        settings = DistillSettings(c.steps, c.batch, c.lr, c.local_weight, 0.0, c.seed, engine=engine,
                                   match_blocks=match_blocks)
        grid = lambda name: c.scale_lr_factor if name.endswith((".scales", ".zeros")) else 1.0  # noqa: E731
        self.history = distill(model, teacher, windows, params, None, settings, device,
                None if saved is None else saved / "e2e", resume,
                (lambda d, t, note: progress(d, t, f"end-to-end | {note}")) if progress else None, lr_factor=grid,
                tracker=tracker, mix=mix)

    @staticmethod
    def _store(model: nn.Module, fakes: dict[str, FakeQuantLinear]) -> None:
        """Each trained module back as its stored kind; a tied head reads the stored embedding."""
        for name, fake in fakes.items():
            _put(model, name, fake.to_stored())
            if fake.embedding and isinstance(model.get_output_embeddings(), FakeTiedHead):
                head_name = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
                head = TiedHead(name)
                _put(model, head_name, head)
                head.bind(model)
        model.requires_grad_(False)  # trained norms included


def _put(model: nn.Module, name: str, module: nn.Module) -> None:
    """`module` at `name` without replace_module's tied-head rewiring (qat ties its own heads); a
    scaled embedding's scale is carried over all the same."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    carry_embedding_scale(getattr(parent, leaf, None), module)
    setattr(parent, leaf, module)
