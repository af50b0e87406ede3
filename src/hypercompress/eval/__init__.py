"""Quality measurements: perplexity, KL to a teacher, top-1 agreement, tokens/s."""

from .perplexity import evaluate_windows, protocol_text, teacher_log_probs

__all__ = ["evaluate_windows", "protocol_text", "teacher_log_probs"]
