"""Distilling from another model: a different, usually larger teacher that shares the student's tokenizer.

Trained stages (qat, distill) distil against the model's own original by default. Given a
`distill_teacher` (apply.apply_recipe; `--teacher MODEL` on the command line), they match its next-token
distributions instead and it writes their training corpus, as in the knowledge-distillation recipes
for families of one tokenizer (Llama-3 -> a smaller Llama-3, Phi-2 -> Phi-1.5, GPT-2 -> DistilGPT-2;
Hinton et al. 2015, Sanh et al. 2019). Per-block hidden-state matching (`local_weight`) and the
activation-stability term compare blocks of one model with its own copy: for another teacher they are
off (different widths, depths and bases), so the loss is the KL alone. Block-AP (qat) still rebuilds
each block from the student's own original, the only model with the same blocks.

The KL compares the first min(V_student, V_teacher) vocabulary rows: families pad their output
layer to different multiples (Qwen2.5-0.5B stores 151,936 rows, Qwen2.5-7B 152,064) over one
tokenizer, whose ids all lie below both.
"""

from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from ..errors import UserError
from ..modules import first_non_finite


def check_teacher_stages(methods: Iterable[Any]) -> None:
    """UserError unless every trained stage among `methods` (method instances or classes) can
    distil from another model and there is at least one."""
    trained = [m for m in methods if getattr(m, "trains", False)]
    if not trained:
        raise UserError("a distillation teacher is for trained stages (qat, distill) and this run has none: "
                        "add --distill (with a size target) or a qat / distill stage, or drop --teacher")
    for method in trained:
        if not getattr(method, "takes_distill_teacher", False):
            name = getattr(method, "name", "") or type(method).__name__
            raise UserError(f"stage '{name}' distils against the model's own original; another teacher is for "
                            "qat and distill stages: drop --teacher or that stage")


def check_teacher_model(student: nn.Module, teacher: nn.Module) -> int:
    """The vocabulary rows the KL compares (min of both output layers'); UserError for a teacher
    of an unsupported family or without an output layer."""
    from ..arch import arch_of

    arch_of(getattr(teacher.config, "model_type", ""))  # its blocks are compiled like the student's
    rows = []
    for who, model in (("model", student), ("teacher", teacher)):
        head = model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if head is None or weight is None or weight.dim() != 2:
            raise UserError(f"the {who} has no output layer to read next-token distributions from; "
                            "pass a causal language model")
        rows.append(int(weight.shape[0]))
    name = first_non_finite(teacher)
    if name is not None:
        raise UserError(f"the teacher's tensor {name} holds inf or nan; pass a teacher whose weights are finite")
    return min(rows)


def written_vocabulary(student: nn.Module, teacher: nn.Module) -> int | None:
    """The ids a teacher may write into the student's training corpus: the student's vocabulary rows
    when the teacher holds more (padding beyond the student's embedding), else None (all)."""
    ours, theirs = student.config.vocab_size, teacher.config.vocab_size
    return ours if theirs > ours else None


def check_shared_tokenizer(tokenizer: Any, teacher_tokenizer: Any, rows: int) -> None:
    """UserError unless both tokenizers map the same strings to the same ids (their vocabularies are
    equal) and every id lies below `rows`, the vocabulary rows the KL compares."""
    if tokenizer is None or teacher_tokenizer is None:
        raise UserError("checking that the teacher shares the model's tokenizer needs both tokenizers: pass "
                        "tokenizer= and teacher_tokenizer= with loaded models")
    ours, theirs = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if ours != theirs:
        differing = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda item: item[1])
        token, index = differing[0]
        raise UserError(f"the teacher's tokenizer differs from the model's ({len(ours):,} vs {len(theirs):,} "
                        f"entries; e.g. {token!r} -> id {index} in only one): distillation compares "
                        "next-token distributions id by id; pass a teacher with the same tokenizer")
    if len(tokenizer) > rows:
        raise UserError(f"the tokenizer has {len(tokenizer):,} ids but the model or the teacher scores only "
                        f"{rows:,}; pass models whose output layers cover the tokenizer")
