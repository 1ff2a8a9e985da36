"""Distribution alignment of pseudo-label probabilities (ReMixMatch, Berthelot et al. 2020).

On class-imbalanced data the network under-predicts rare classes on unlabeled images; confident
pseudo-labels then teach it to under-predict them further (confirmation bias: on the synthetic
dataset a fifth of the blob pixels got a confident *background* pseudo-label and almost none a
confident blob one). Alignment rescales each pixel's class probabilities by how much rarer the
class is in the predictions than in the labels, before the argmax and the confidence filter:

    p~_k = normalize_k( p_k * pi_l[k] / pi_u[k] )

with pi_l the running class frequency of the labeled ground-truth pixels and pi_u the running
mean predicted distribution over the valid unlabeled pixels (both exponential moving averages,
summed over all ranks under DDP so every rank aligns alike).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from segcon.utils.static import class_counts


class DistributionAlignment(nn.Module):
    """Running class statistics (buffers: saved with the checkpoint) and the alignment itself.

    Args:
        num_classes: K.
        ignore_index: label value of unscored labeled pixels.
        momentum: EMA momentum of both running distributions (the first batch initialises them).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, momentum: float = 0.99) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"distribution alignment momentum must lie in [0, 1), got {momentum}")
        self.num_classes, self.ignore_index, self.momentum = num_classes, ignore_index, momentum
        self.register_buffer("labeled_prior", torch.zeros(num_classes))
        self.register_buffer("unlabeled_mean", torch.zeros(num_classes))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def forward(self, probs: Tensor, valid: Tensor, labels: Tensor) -> Tensor:
        """Update the running distributions with this step's batches and align `probs`.

        Args:
            probs: `[B, K, H, W]` pseudo-label probabilities of the unlabeled weak views.
            valid: `[B, H, W]` bool, False on crop padding (left out of pi_u).
            labels: `[B', H', W']` ground truth of the labeled batch (ignore_index left out of pi_l).
        Returns: `[B, K, H, W]` aligned probabilities (each pixel sums to 1).
        """
        k = self.num_classes
        scored = (labels != self.ignore_index) & (labels >= 0) & (labels < k)
        counts = class_counts(labels, scored, k).to(probs.dtype)
        sums = (probs * valid.unsqueeze(1)).sum((0, 2, 3))
        stats = torch.cat([counts, sums, valid.sum().to(probs.dtype).reshape(1)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        counts, sums, n_valid = stats[: self.num_classes], stats[self.num_classes : -1], stats[-1]
        prior = counts / counts.sum().clamp_min(1)
        mean = sums / n_valid.clamp_min(1)
        m = self.momentum * (self.steps > 0).to(self.labeled_prior.dtype)  # the first batch initialises (no host sync)
        self.labeled_prior.mul_(m).add_((1 - m) * prior.to(self.labeled_prior.dtype))
        self.unlabeled_mean.mul_(m).add_((1 - m) * mean.to(self.unlabeled_mean.dtype))
        self.steps += 1
        ratio = (self.labeled_prior / self.unlabeled_mean.clamp_min(1e-6)).to(probs.dtype)
        aligned = probs * ratio.view(1, -1, 1, 1)
        return aligned / aligned.sum(1, keepdim=True).clamp_min(1e-12)
