"""KL(teacher || student) of next-token distributions, computed in chunks of positions.

A step over B x T positions and a vocabulary of V entries would otherwise hold the teacher's and
the student's (B T, V) logits in float32 plus their softmaxes and the gradient (SmolLM2, 8 x 512
positions, V = 49,152: 0.8 GB per tensor). `chunked_kl` takes the final hidden states and the
output matrices instead, and for each chunk of positions computes both logits (in the compute
dtype, bf16 under the engine), the KL in float32, and the gradient of the KL with respect to the
student's hidden states and output matrix right away (dKL/dz_s = softmax(z_s) - softmax(z_t) per
position), as the fused linear-cross-entropy losses of Liger-Kernel and torchtune do; so at most one
chunk's logits exist at a time and backward only scales the stored gradients. `kl_to_teacher` is the
plain version the tests compare it with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 2048  # positions per chunk: (2048, 49152) float32 logits are 0.4 GB


def kl_to_teacher(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p_teacher || p_student): logits (..., V) -> scalar (float32)."""
    t = F.log_softmax(teacher_logits.float(), -1)
    s = F.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_student, w_student, h_teacher, w_teacher, chunk: int, dtype: torch.dtype):
        positions = h_student.shape[0]
        hs_all, ws = h_student.detach().to(dtype), w_student.detach().to(dtype)
        ht_all, wt = h_teacher.detach().to(dtype), w_teacher.detach().to(dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty(hs_all.shape, dtype=torch.float32, device=hs_all.device) if need_h else None
        grad_w = torch.zeros(ws.shape, dtype=torch.float32, device=ws.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hs_all.device)
        with torch.autocast(hs_all.device.type, enabled=False):
            for start in range(0, positions, chunk):
                hs, ht = hs_all[start:start + chunk], ht_all[start:start + chunk]
                log_s = F.log_softmax((hs @ ws.t()).float(), -1)
                log_t = F.log_softmax((ht @ wt.t()).float(), -1)
                p_t = log_t.exp()
                total += (p_t * (log_t - log_s)).sum()
                if need_h or need_w:
                    grad_z = ((log_s.exp() - p_t) / positions).to(dtype)  # dKL/dz_student, mean over positions
                    if need_h:
                        grad_h[start:start + chunk] = (grad_z @ ws).float()
                    if need_w:
                        grad_w += (grad_z.t() @ hs).float()
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.dtypes = (h_student.dtype, w_student.dtype)
        return total / positions

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (None if grad_h is None else (grad_h * grad_out).to(h_dtype),
                None if grad_w is None else (grad_w * grad_out).to(w_dtype), None, None, None, None)


def chunked_kl(h_student: torch.Tensor, w_student: torch.Tensor, h_teacher: torch.Tensor, w_teacher: torch.Tensor,
               chunk: int = CHUNK, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean over positions of KL(softmax(h_t W_t^T) || softmax(h_s W_s^T)), differentiable in the
    student's h_s (P, D) and W_s (V, D); the teacher's h_t (P, D_t) and W_t (V, D_t) are constants
    (D_t: another teacher's width, training/teacher.py).
    Logits are formed in `dtype` (default h_s's) `chunk` positions at a time, softmaxes in float32.
    Returns a float32 scalar (nats per position)."""
    if h_student.shape[0] != h_teacher.shape[0] or w_student.shape[1] != h_student.shape[1] \
            or w_teacher.shape[1] != h_teacher.shape[1] or w_student.shape[0] != w_teacher.shape[0]:
        raise ValueError(f"chunked_kl: shapes h_s {tuple(h_student.shape)}, W_s {tuple(w_student.shape)}, "
                         f"h_t {tuple(h_teacher.shape)}, W_t {tuple(w_teacher.shape)} do not match")
    return _ChunkedKL.apply(h_student, w_student, h_teacher, w_teacher, chunk, dtype or h_student.dtype)
