"""What an edit did to behaviour: the concept's own tokens, and the text around them.

Distinctive tokens: those of the concept's fit lines seen at least twice there and never in the
contrast's fit lines (S_concept), and the other way round (S_contrast); for "numbers as digits"
against "numbers as words" they are the digit tokens and the number words.
Behaviour, teacher-forced on held-out lines (never fitted on):
- concept_nll / contrast_nll: mean next-token NLL (nats) over each file's held-out lines;
- marker_nll: mean NLL of the concept lines' tokens that are in S_concept (how readily the model
  writes the concept's own tokens);
- preference: at every held-out position whose next token is in S_concept or S_contrast, the mean of
  p(S_concept) / (p(S_concept) + p(S_contrast)): which form the model prefers where either could come
  (0.5 = no preference).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from .probes import pad_right


def distinctive_tokens(concept: list[torch.Tensor], contrast: list[torch.Tensor], least: int = 2
                       ) -> tuple[list[int], list[int]]:
    """(S_concept, S_contrast): sorted token ids seen >= `least` times on one side and never on the other."""
    counts_c = Counter(t for ids in concept for t in ids.tolist())
    counts_n = Counter(t for ids in contrast for t in ids.tolist())
    only_c = sorted(t for t, n in counts_c.items() if n >= least and t not in counts_n)
    only_n = sorted(t for t, n in counts_n.items() if n >= least and t not in counts_c)
    return only_c, only_n


@torch.inference_mode()
def _line_log_probs(model: nn.Module, lines: list[torch.Tensor], device: str, batch_size: int = 8):
    """Yields (log_probs (T - 1, vocab) float32, targets (T - 1,)) per line of >= 2 tokens."""
    usable = [ids for ids in lines if ids.numel() >= 2]
    for start in range(0, len(usable), batch_size):
        chosen = usable[start:start + batch_size]
        batch, mask = pad_right(chosen)
        logits = model(input_ids=batch.to(device), attention_mask=mask.to(device), use_cache=False).logits
        log_probs = F.log_softmax(logits.float(), dim=-1).cpu()
        for row, ids in enumerate(chosen):
            yield log_probs[row, :ids.numel() - 1], ids[1:]


def behaviour(model: nn.Module, concept: list[torch.Tensor], contrast: list[torch.Tensor],
              s_concept: list[int], s_contrast: list[int], device: str = "cpu") -> dict:
    """The module docstring's metrics on held-out lines; a metric with no position to measure is None."""
    in_c, in_n = torch.tensor(s_concept, dtype=torch.long), torch.tensor(s_contrast, dtype=torch.long)
    result = {}
    marker_sum, marker_count, pref_sum, pref_count = 0.0, 0, 0.0, 0
    for side, lines in (("concept", concept), ("contrast", contrast)):
        nll_sum, count = 0.0, 0
        for log_p, targets in _line_log_probs(model, lines, device):
            nll = -log_p.gather(-1, targets[:, None])[:, 0].double()
            nll_sum, count = nll_sum + float(nll.sum()), count + targets.numel()
            marked_c = torch.isin(targets, in_c)
            if side == "concept" and bool(marked_c.any()):
                marker_sum, marker_count = marker_sum + float(nll[marked_c].sum()), marker_count + int(marked_c.sum())
            either = marked_c | torch.isin(targets, in_n)
            if in_c.numel() and in_n.numel() and bool(either.any()):
                p = log_p[either].exp().double()
                mass_c, mass_n = p[:, in_c].sum(-1), p[:, in_n].sum(-1)
                pref_sum += float((mass_c / (mass_c + mass_n).clamp_min(1e-300)).sum())
                pref_count += int(either.sum())
        result[f"{side}_nll"] = nll_sum / count if count else None
    result["marker_nll"] = marker_sum / marker_count if marker_count else None
    result["preference"] = pref_sum / pref_count if pref_count else None
    result["marker_positions"], result["preference_positions"] = marker_count, pref_count
    return result
