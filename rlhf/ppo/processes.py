"""Statistics and gradients summed over every process of a data-parallel run.

PPO does not wrap its model in DDP (see :meth:`Processes.sync_gradients`), so whatever must be the
same on every process (whitening, logged means, the NaN stop) is reduced here. With one process
each method is the plain local computation.
"""

from __future__ import annotations

import torch

from rlhf.ppo import math as pm


class Processes:
    """Reductions over the processes of an ``accelerate.Accelerator``."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.count = accelerator.num_processes
        self.index = accelerator.process_index
        self.device = accelerator.device

    def sum(self, value: torch.Tensor) -> float:
        """Sum of a scalar over every process."""
        if self.count == 1:
            return float(value)
        return float(self.accelerator.reduce(value.reshape(1).to(self.device), reduction="sum"))

    def mean(self, values: torch.Tensor) -> float:
        """Mean over every process's rows ``(b,)``."""
        if self.count == 1:
            return float(values.float().mean())
        return float(self.accelerator.gather(values.float().to(self.device)).mean())

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every process's rows ``(b,)`` concatenated, in process order."""
        if self.count == 1:
            return values
        return self.accelerator.gather(values.to(self.device)).to(values.device)

    def var(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        """Unbiased variance of the masked-in entries of ``values`` ``(b, t)`` over every process."""
        m = mask.to(values.dtype)
        n = self.sum(m.sum())
        mean = self.sum((values * m).sum()) / max(n, 1.0)
        return self.sum((((values - mean) * m) ** 2).sum()) / max(n - 1, 1.0)

    def whiten(self, values: torch.Tensor, mask: torch.Tensor, shift_mean: bool) -> torch.Tensor:
        """:func:`rlhf.ppo.math.masked_whiten` with mean and variance over every process's real tokens."""
        if self.count == 1:
            return pm.masked_whiten(values, mask, shift_mean=shift_mean)
        m = mask.to(values.dtype)
        totals = torch.stack([(values * m).sum(), (values * values * m).sum(), m.sum()])
        totals = self.accelerator.reduce(totals.to(self.device), reduction="sum").to(values.device)
        mean = totals[0] / totals[2]
        var = (totals[1] / totals[2] - mean**2) * totals[2] / (totals[2] - 1).clamp(min=1)
        whitened = (values - mean) * torch.rsqrt(var + 1e-8)
        if not shift_mean:
            whitened = whitened + mean
        return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))

    def sync_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over processes in one flat all-reduce.

        By hand rather than by wrapping the model in DDP: a micro-batch can run two roles' forward
        passes (policy and value adapters) before their backward passes, and the frozen roles'
        adapters get no gradient at all, both of which DDP's bucketed hooks reject. Missing
        gradients count as zeros, so every process reduces the same flat buffer.
        """
        if self.count == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]).to(self.device), reduction="sum")
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(p).to(p.device)
            offset += g.numel()

    def which(self, flag: bool) -> list[int]:
        """The indices of the processes that passed ``flag=True`` (every process must call this)."""
        if self.count == 1:
            return [0] if flag else []
        found = torch.zeros(self.count, device=self.device)
        found[self.index] = float(flag)
        found = self.accelerator.reduce(found, reduction="sum")
        return found.nonzero().flatten().tolist()
