"""DMD2's optional GAN term: a classifier head on the fake score's bottleneck.

DMD2 (Yin et al. 2024) puts a small classifier on the fake score network's
bottleneck features at a noisy input ``x_t``.  The head is trained with the fake
score, real images (noised) against generator samples (noised), with the
non-saturating GAN loss; the generator gets ``softplus(-D(x_t))`` of its own
samples, the gradient flowing through the fake score's forward into ``x0``.

The parts here are self-contained; the training loop decides when to call them:

* :func:`capture_bottleneck` records the bottleneck output with a forward hook
  (a U-Net's ``mid_block``, a DiT's middle transformer block) and can stop the
  forward there, since nothing after the bottleneck reaches the head;
* :class:`BottleneckHead` turns those features into one logit per sample, in fp32;
* :func:`discriminator_loss` / :func:`generator_gan_loss` are the two losses;
* :class:`GANTerm` runs the fake score and the head and returns weighted losses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Bottleneck",
    "BottleneckHead",
    "GANTerm",
    "bottleneck_channels",
    "bottleneck_module",
    "capture_bottleneck",
    "discriminator_loss",
    "generator_gan_loss",
]


# -- losses -----------------------------------------------------------------------------------


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Non-saturating GAN loss of the classifier: ``mean(softplus(-real)) + mean(softplus(fake))``.

    ``softplus(-x) = -log sigmoid(x)``: real samples are pushed to positive logits,
    generator samples to negative ones.
    """
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def generator_gan_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss ``mean(softplus(-fake))``: make samples look real."""
    return F.softplus(-logits_fake).mean()


# -- the bottleneck ---------------------------------------------------------------------------


def bottleneck_module(denoiser: nn.Module) -> nn.Module:
    """The module whose output is the bottleneck: ``mid_block`` or the middle transformer block."""
    mid = getattr(denoiser, "mid_block", None)
    if isinstance(mid, nn.Module):
        return mid
    blocks = getattr(denoiser, "transformer_blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 0:
        return blocks[len(blocks) // 2]
    raise ValueError(
        f"{type(denoiser).__name__} has neither a mid_block (U-Net) nor transformer_blocks "
        "(DiT): the GAN term does not know where its bottleneck is"
    )


def bottleneck_channels(denoiser: nn.Module) -> int:
    """Feature width at the bottleneck, read from the denoiser's config (no forward pass)."""
    module = bottleneck_module(denoiser)
    config = getattr(denoiser, "config", None)
    if module is getattr(denoiser, "mid_block", None) and config is not None:
        if getattr(config, "block_out_channels", None):
            return int(config.block_out_channels[-1])
    if config is not None and getattr(config, "num_attention_heads", None):
        if getattr(config, "attention_head_dim", None) and hasattr(denoiser, "transformer_blocks"):
            return int(config.num_attention_heads) * int(config.attention_head_dim)
    raise ValueError(
        f"cannot read the bottleneck width of {type(denoiser).__name__} from its config; "
        "pass in_channels to BottleneckHead"
    )


@dataclass
class Bottleneck:
    """What :func:`capture_bottleneck` recorded: the last bottleneck output (``None`` before)."""

    features: Tensor | None = None
    calls: int = 0


class _StopForward(Exception):
    """Raised by the hook to end the denoiser's forward at the bottleneck."""


@contextlib.contextmanager
def capture_bottleneck(denoiser: nn.Module, stop: bool = False) -> Iterator[Bottleneck]:
    """Record the denoiser's bottleneck output while the block is open.

    ``with capture_bottleneck(unet) as cap: backbone.predict(...)`` leaves the
    features in ``cap.features``: ``(B, C, h, w)`` for a U-Net's ``mid_block``,
    ``(B, N, C)`` tokens for a DiT's middle block.  With ``stop=True`` the first
    forward ends at the bottleneck (the rest of the network is not computed; the
    call inside the block then returns nothing and the block exits normally).
    Later calls in the same block (activation-checkpoint recomputation) only record.
    """
    module = bottleneck_module(denoiser)
    record = Bottleneck()

    def hook(_module, _args, output):
        features = output[0] if isinstance(output, (tuple, list)) else output
        record.features = features
        record.calls += 1
        if stop and record.calls == 1:
            raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield record
    except _StopForward:
        pass
    finally:
        handle.remove()


# -- the head ---------------------------------------------------------------------------------


def _groups(channels: int) -> int:
    """GroupNorm groups: at most 32 and at least 8 channels each where possible.

    A 1x1 bottleneck normalises over the channels of a group only; one channel per
    group would make every feature 0 there.
    """
    most = max(1, min(32, channels // 8))
    return max(g for g in range(1, most + 1) if channels % g == 0)


class BottleneckHead(nn.Module):
    """Bottleneck features to one logit per sample, always in float32.

    Feature maps ``(B, C, h, w)``: Conv 3x3 -> GroupNorm -> SiLU -> Conv 3x3 -> SiLU
    -> global average pool -> Linear(C, 1).  Tokens ``(B, N, C)`` (a DiT): the same
    with per-token Linear layers and LayerNorm in place of the convolutions.  Padding
    keeps the size, so it works down to a 1x1 bottleneck; normalisation is per sample,
    so real and fake batches may be concatenated.

    With ``in_channels=None`` the layers are built at the first forward from the
    feature shape; build it from :func:`bottleneck_channels` instead when its
    parameters must go into an optimizer before any forward.
    """

    def __init__(self, in_channels: int | None = None, layout: str = "image"):
        super().__init__()
        if layout not in ("image", "tokens"):
            raise ValueError(f"layout must be 'image' or 'tokens', got {layout!r}")
        self.layout = layout
        self.in_channels = None
        self.body: nn.Module | None = None
        self.out: nn.Linear | None = None
        if in_channels is not None:
            self._build(int(in_channels), layout)

    @classmethod
    def for_denoiser(cls, denoiser: nn.Module) -> BottleneckHead:
        """A head sized for ``denoiser``'s bottleneck (built now: parameters exist)."""
        layout = (
            "image" if isinstance(getattr(denoiser, "mid_block", None), nn.Module) else "tokens"
        )
        return cls(bottleneck_channels(denoiser), layout)

    @property
    def built(self) -> bool:
        return self.body is not None

    def _build(self, channels: int, layout: str, device=None) -> None:
        if channels < 1:
            raise ValueError(f"in_channels must be positive, got {channels}")
        if layout == "image":
            body = nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.GroupNorm(_groups(channels), channels),
                nn.SiLU(),
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.SiLU(),
            )
        else:
            body = nn.Sequential(
                nn.Linear(channels, channels),
                nn.LayerNorm(channels),
                nn.SiLU(),
                nn.Linear(channels, channels),
                nn.SiLU(),
            )
        self.in_channels, self.layout = channels, layout
        self.body = body.to(device=device, dtype=torch.float32)
        self.out = nn.Linear(channels, 1).to(device=device, dtype=torch.float32)

    def _apply(self, fn, recurse=True):
        # ``.half()`` / ``.to(bf16)`` move the head but keep its weights in fp32, unrounded
        def keep_fp32(tensor):
            out = fn(tensor)
            if tensor.is_floating_point() and out.is_floating_point() and out.dtype != tensor.dtype:
                return tensor.to(device=out.device, dtype=torch.float32)
            return out

        return super()._apply(keep_fp32, recurse)

    def forward(self, features: Tensor) -> Tensor:
        """Logits ``(B,)`` in float32 (autocast off inside the head)."""
        layout = {4: "image", 3: "tokens"}.get(features.ndim)
        if layout is None:
            raise ValueError(
                "BottleneckHead takes (B, C, H, W) feature maps or (B, N, C) tokens, got "
                f"shape {tuple(features.shape)}"
            )
        channels = features.shape[1] if layout == "image" else features.shape[-1]
        if not self.built:
            self._build(channels, layout, features.device)
        if layout != self.layout or channels != self.in_channels:
            raise ValueError(
                f"BottleneckHead built for {self.layout} features with {self.in_channels} "
                f"channels, got {layout} features of shape {tuple(features.shape)}"
            )
        with torch.autocast(features.device.type, enabled=False):
            h = self.body(features.float())
            pooled = h.mean(dim=(2, 3)) if layout == "image" else h.mean(dim=1)
            return self.out(pooled).squeeze(-1)

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}, in_channels={self.in_channels}"


# -- the term ---------------------------------------------------------------------------------


def _pair(value: Any, sizes: tuple[int, int], name: str) -> Any:
    """``(real, fake)`` -> one batch value; a shared value is used for both halves."""
    from wadi.backbones import TextCondition

    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(f"{name} must be one value or a (real, fake) pair")
        real, fake = value
    else:
        real = fake = value
    if isinstance(real, TextCondition):
        if (len(real), len(fake)) != sizes:
            raise ValueError(
                f"{name}: {len(real)} real and {len(fake)} fake conditions for batches of "
                f"{sizes[0]} real and {sizes[1]} fake inputs"
            )
        return TextCondition.cat([real, fake])
    parts = []
    for part, size in zip((real, fake), sizes):
        part = torch.as_tensor(part)
        parts.append(part.expand(size) if part.ndim == 0 else part)
    return torch.cat([p.to(parts[0].device) for p in parts])


@dataclass(eq=False)
class GANTerm:
    """DMD2's GAN term: the head plus the two loss weights.

    ``weight`` scales the generator loss, ``discriminator_weight`` the classifier
    loss added to the fake score's.  ``fake_role`` is a no-argument callable returning a
    context manager that switches the denoiser to the fake score (``roles.fake``).
    Both losses stop the forward at the bottleneck.  Notes for the loop:

    * put :meth:`parameters` in the fake score's optimizer;
    * the generator loss also leaves gradients on the fake adapter and the head:
      zero them before the fake-score step;
    * with activation checkpointing, call ``backward`` inside ``fake_role()``.
    """

    head: BottleneckHead = field(default_factory=BottleneckHead)
    weight: float = 1e-3
    discriminator_weight: float = 1.0
    stats: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def for_backbone(cls, backbone, **kwargs) -> GANTerm:
        """A term whose head is sized for ``backbone.denoiser`` and on its device."""
        head = BottleneckHead.for_denoiser(backbone.denoiser).to(backbone.device)
        return cls(head=head, **kwargs)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def logits(self, backbone, x_t: Tensor, t, cond, fake_role: Callable) -> Tensor:
        """Head logits ``(B,)`` of the fake score's bottleneck at ``(x_t, t, cond)``."""
        with fake_role():
            with capture_bottleneck(backbone.denoiser, stop=True) as cap:
                backbone.predict(x_t, t, cond)
        if cap.features is None:
            raise RuntimeError("the denoiser's forward never reached its bottleneck")
        return self.head(cap.features)

    def discriminator_loss(
        self, backbone, x_t_real: Tensor, x_t_fake: Tensor, t, cond, fake_role: Callable
    ) -> Tensor:
        """``discriminator_weight *`` the classifier loss, real vs fake in one forward.

        ``t`` and ``cond`` are one value shared by both batches (equal sizes) or a
        ``(real, fake)`` pair.  ``x_t_fake`` is detached: this loss trains the head and
        the fake score only.
        """
        sizes = (x_t_real.shape[0], x_t_fake.shape[0])
        x_t = torch.cat([x_t_real.detach().to(x_t_fake.dtype), x_t_fake.detach()])
        logits = self.logits(
            backbone, x_t, _pair(t, sizes, "t"), _pair(cond, sizes, "cond"), fake_role
        )
        real, fake = logits.split(sizes)
        loss = discriminator_loss(real, fake)
        self.stats.update(
            gan_d_loss=loss.detach(),
            logit_real=real.detach().mean(),
            logit_fake=fake.detach().mean(),
        )
        return self.discriminator_weight * loss

    def generator_loss(self, backbone, x_t: Tensor, t, cond, fake_role: Callable) -> Tensor:
        """``weight * mean(softplus(-D(x_t)))``; ``x_t`` keeps its graph back to ``x0``."""
        loss = generator_gan_loss(self.logits(backbone, x_t, t, cond, fake_role))
        self.stats["gan_g_loss"] = loss.detach()
        return self.weight * loss
