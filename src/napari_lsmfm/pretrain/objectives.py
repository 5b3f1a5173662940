"""The pretraining losses, each a plain function of tensors, and the small modules they need.

- masked reconstruction: L1 between a light decoder's output and the input, on masked voxels;
- distillation: KL between the EMA teacher's and the student's per-voxel feature
  distributions (L2-normalised features, sharpened by temperatures), on masked voxels;
- image-text alignment: cosine distance between an image embedding and its caption's;
- CLIP: symmetric InfoNCE with a learnable temperature, where batch items that share a
  caption count as positives of each other;
- structure (ours, not in the published recipe): binary cross-entropy + soft Dice of a 1x1x1
  head on the dense features against the structure mask, where the data know it (the
  synthetic corpus), so the features mark what is structure and where its border lies.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LOGIT_SCALE_INIT = math.log(1 / 0.1)
LOGIT_SCALE_MAX = math.log(100.0)


class ReconstructionHead(nn.Module):
    """Light conv decoder from features (B, embed_dim, D, H, W) to intensities
    (B, out_channels, D, H, W); layers embed_dim -> 64 -> 32 -> out with keys
    ``decoder.{0,2,4}`` as in the published checkpoints.

    kernel_size: of the first two convolutions. 1 (the default) keeps the head cheap at full
    resolution (the backbone already sees the context); 3 costs about 27 times more.
    """

    def __init__(self, embed_dim: int, out_channels: int = 1, kernel_size: int = 1) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.decoder = nn.Sequential(
            nn.Conv3d(embed_dim, 64, kernel_size, padding=pad),
            nn.GELU(),
            nn.Conv3d(64, 32, kernel_size, padding=pad),
            nn.GELU(),
            nn.Conv3d(32, out_channels, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.decoder(features)

    def forward_voxels(self, features: torch.Tensor, voxels: torch.Tensor) -> torch.Tensor:
        """The reconstruction at selected voxels only: features (B, E, D, H, W), voxels
        (B, D, H, W) bool -> (N, out_channels) for the N True voxels, in ``voxels`` order.

        With 1x1x1 kernels the head is the same per-voxel MLP, so computing it where the
        loss looks (the masked voxels) saves most of its cost at full resolution.
        """
        selected = features.movedim(1, -1)[voxels]  # (N, E)
        if self.decoder[0].kernel_size != (1, 1, 1):
            return self.decoder(features).movedim(1, -1)[voxels]
        for layer in self.decoder:
            if isinstance(layer, nn.Conv3d):
                selected = F.linear(selected, layer.weight.flatten(1), layer.bias)
            else:
                selected = layer(selected)
        return selected


def masked_l1(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over masked voxels.

    prediction, target: (B, C, D, H, W); mask: bool, broadcastable to them, True where
    masked. Returns a scalar; zero (with gradient) when nothing is masked.
    """
    mask = mask.expand_as(target)
    diff = (prediction.float() - target.float()).abs()
    count = mask.sum()
    if count == 0:
        return diff.sum() * 0.0
    return diff[mask].sum() / count


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.025,
) -> torch.Tensor:
    """KL(teacher || student) of per-voxel softmax distributions over feature channels.

    student, teacher: (B, E, D, H, W) features; both are L2-normalised over E, divided by
    their temperature and soft-maxed over E. mask: (B, 1 or C, D, H, W) bool, a voxel
    counts when any channel is masked. The teacher carries no gradient. Returns a scalar,
    the mean KL over masked voxels (zero when nothing is masked).
    """
    voxels = mask.any(dim=1)  # (B, D, H, W)
    if not bool(voxels.any()):
        return student.sum() * 0.0
    s = student.float().movedim(1, -1)[voxels]  # (N, E)
    t = teacher.detach().float().movedim(1, -1)[voxels]
    s = F.normalize(s, dim=-1) / student_temp
    t = F.normalize(t, dim=-1) / teacher_temp
    log_q = F.log_softmax(s, dim=-1)
    log_p = F.log_softmax(t, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


class StructureHead(nn.Module):
    """1x1x1 convolution from the dense features (B, embed_dim, D, H, W) to one structure
    logit per voxel: a linear read-out, so the features themselves must carry the mask."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(embed_dim, 1, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(features)


def structure_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy + soft Dice (MONAI, over the whole batch) of structure logits
    (N, 1, D, H, W) against a 0/1 mask of the same shape, over every voxel. Masked cubes
    hide structure from the student, so runs that train this objective for its features
    turn masking off (``mask_ratio`` 0; see the default model's card)."""
    from monai.losses import DiceLoss

    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=1.0, smooth_dr=1.0)(logits, target)
    return bce + dice


def alignment_loss(image_embedding: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance ``1 - cos`` between paired rows of (N, P) embeddings."""
    return (1 - F.cosine_similarity(image_embedding.float(), text_embedding.float(), dim=-1)).mean()


def clip_loss(
    image_embedding: torch.Tensor,
    text_embedding: torch.Tensor,
    logit_scale: torch.Tensor,
    caption_ids: torch.Tensor | None = None,
    text_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE between N images and M captions.

    image_embedding: (N, P); text_embedding: (M, P).
    logit_scale: scalar log of the inverse temperature (learnable), clamped to <= log 100.
    caption_ids: (N,) label ids of the images. With ``text_ids`` None the rows are pairs
    (M == N) and rows with the same id share a caption, so they are positives of each
    other (otherwise a batch with two "nuclei" volumes would push one nuclei caption away
    from a nuclei image). text_ids: (M,) label ids of the captions, when the captions are
    not row-paired (e.g. one description per label: every label is a negative even in a
    batch of two). None and None: every row is its own class (the standard CLIP loss).
    Returns a scalar: the mean of the image->text and text->image terms, each
    ``-log(sum of softmax over the positives)``; the text->image term counts captions
    that have a positive image. With one distinct caption it is zero.
    """
    n = image_embedding.shape[0]
    img = F.normalize(image_embedding.float(), dim=-1)
    txt = F.normalize(text_embedding.float(), dim=-1)
    scale = logit_scale.float().clamp(max=LOGIT_SCALE_MAX).exp()
    logits = scale * img @ txt.t()  # (N images, M texts)
    if caption_ids is None:
        positives = torch.eye(n, dtype=torch.bool, device=logits.device)
    else:
        ids = caption_ids.to(logits.device)
        other = ids if text_ids is None else text_ids.to(logits.device)
        positives = ids[:, None] == other[None, :]
    neg_inf = torch.finfo(logits.dtype).min

    def one_side(lg: torch.Tensor, pos_mask: torch.Tensor) -> torch.Tensor:
        rows = pos_mask.any(dim=1)
        if not bool(rows.any()):
            return lg.sum() * 0.0
        lg, pos_mask = lg[rows], pos_mask[rows]
        pos = torch.logsumexp(lg.masked_fill(~pos_mask, neg_inf), dim=1)
        return (torch.logsumexp(lg, dim=1) - pos).mean()

    return 0.5 * (one_side(logits, positives) + one_side(logits.t(), positives.t()))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student for parameters; buffers (batch-norm
    statistics) are copied. Both modules must have the same structure."""
    t_params = dict(teacher.named_parameters())
    for name, p in student.named_parameters():
        t = t_params[name]
        t.mul_(decay).add_(p.detach().to(t.dtype), alpha=1 - decay)
    t_buffers = dict(teacher.named_buffers())
    for name, b in student.named_buffers():
        t_buffers[name].copy_(b)
