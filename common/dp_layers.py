"""Per-layer DP-SGD support for timm ConvNeXt in Opacus: exact, and cheap enough to use.

Why Opacus's own hooks and ghost modes fail on timm ConvNeXt, and what fixes each cause:

- timm's `LayerNorm2d` permutes NCHW to NHWC and back, so the next `Conv2d` (the downsampling
  convs) receives a non-contiguous tensor. Opacus's conv sampler (`unfold2d`) builds its
  patches with `as_strided` from strides it assumes contiguous, and reads the wrong numbers.
  `conv2d_grad_sample` makes the activations contiguous first; for depthwise 7x7 convs it
  computes the per-sample kernel gradients as one grouped convolution (batch x channels
  groups) instead of unfolding 49 copies of every activation.
- `ConvNeXtBlock` owns a parameter itself (`gamma`, the layer scale) and has children with
  parameters. Opacus then either hands the whole block to functorch (slow) or, in ghost mode,
  miscounts the children's parameters. `Relayout` moves `gamma` into a child module
  (`ChannelScale`, after the block's MLP, where the block multiplies by it) for the duration of
  DP training (`Relayout`), and moves it back for anything that reads the model's state dict.
- timm's `LayerNorm` (NHWC) and `LayerNorm2d` are subclasses Opacus does not look up; they get
  samplers here.
- Opacus's ghost norm for `nn.Linear` handles 2-D and 3-D inputs only; ConvNeXt's pointwise MLPs
  see 4-D (N, H, W, C). `linear_norm_sample` flattens the token dimensions and uses, per layer,
  the cheaper exact method (mixed ghost clipping, Bu et al. 2022): Gram matrices of activations
  and output gradients when tokens are few, the per-sample gradient itself when they are many.
  `conv2d_norm_sample` does the same for convolutions, over their output positions.

With these, DermFed's DP step is Opacus's ghost clipping: one forward, a backward that computes
only per-sample gradient norms (no parameter gradients), a second backward of the clipped loss.
`tests/test_privacy.py` checks norms and clipped gradient sums against a torch.func reference.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping
from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
from opacus.utils.tensor_utils import unfold2d
from timm.layers.norm import LayerNorm, LayerNorm2d
from timm.models.convnext import ConvNeXtBlock
from torch import nn

Samples = dict[nn.Parameter, torch.Tensor]


class ChannelScale(nn.Module):
    """A ConvNeXt block's layer scale as a module of its own (see `Relayout`)."""

    def __init__(self, gamma: nn.Parameter, channels_last: bool):
        super().__init__()
        self.gamma, self.channels_last = gamma, channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.gamma if self.channels_last else self.gamma.reshape(1, -1, 1, 1))


class Relayout:
    """Every ConvNeXt block's `gamma` moved into a `ChannelScale` after its MLP, and back.

    The same Parameter and module objects move, so optimizer state, Opacus's hooks and outputs
    are unchanged; `standard()` shows the timm layout (e.g. to save a checkpoint) and returns.
    """

    def __init__(self, model: nn.Module):
        self.moved = []
        for block in model.modules():
            if isinstance(block, ConvNeXtBlock) and block.gamma is not None:
                scale = ChannelScale(block.gamma, channels_last=not block.use_conv_mlp)
                self.moved.append((block, block.gamma, block.mlp, nn.Sequential(block.mlp, scale)))
        self.apply()

    def apply(self) -> None:
        for block, _, _, scaled in self.moved:
            del block._parameters["gamma"]
            block.gamma = None
            block.mlp = scaled

    def undo(self) -> None:
        for block, gamma, mlp, _ in self.moved:
            block.mlp = mlp
            del block.gamma
            block.gamma = gamma

    @contextmanager
    def standard(self) -> Iterator[None]:
        self.undo()
        try:
            yield
        finally:
            self.apply()


def conv2d_grad_sample(layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor) -> Samples:
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    depthwise = (layer.groups == layer.in_channels == layer.out_channels and layer.stride == (1, 1)
                 and layer.dilation == (1, 1) and isinstance(layer.padding, tuple))
    if not (depthwise and n):
        return compute_conv_grad_sample(layer, [x.contiguous()], backprops)
    channels = layer.in_channels
    # d loss / d kernel[n, c] = cross-correlation of input[n, c] with output gradient[n, c]: one grouped conv
    kernels = backprops.reshape(n * channels, 1, *backprops.shape[2:])
    grad = F.conv2d(x.reshape(1, n * channels, *x.shape[2:]), kernels, padding=layer.padding, groups=n * channels)
    samples = {layer.weight: grad.reshape(n, channels, 1, *layer.kernel_size)}
    if layer.bias is not None and layer.bias.requires_grad:
        samples[layer.bias] = backprops.sum(dim=(2, 3))
    return samples


def layer_norm_2d_grad_sample(layer: LayerNorm2d, activations: list[torch.Tensor], backprops: torch.Tensor) -> Samples:
    """LayerNorm2d normalises channels of NCHW: Opacus's LayerNorm sampler on the NHWC view."""
    return compute_layer_norm_grad_sample(layer, [activations[0].permute(0, 2, 3, 1)], backprops.permute(0, 2, 3, 1))


def channel_scale_grad_sample(layer: ChannelScale, activations: list[torch.Tensor], backprops: torch.Tensor) -> Samples:
    x = activations[0].to(backprops.dtype)
    pattern = "n...c,n...c->nc" if layer.channels_last else "nc...,nc...->nc"
    return {layer.gamma: torch.einsum(pattern, x, backprops)}


def linear_norm_sample(layer: nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor) -> Samples:
    """Per-sample gradient norms of a Linear layer over any number of token dimensions (mixed ghost clipping)."""
    a = activations[0].to(backprops.dtype)
    n = a.shape[0]
    a = a.reshape(n, -1, a.shape[-1])  # n, tokens, in
    g = backprops.reshape(n, -1, backprops.shape[-1])  # n, tokens, out
    tokens = a.shape[1]
    norms: Samples = {}
    if layer.weight.requires_grad:
        if tokens * tokens <= a.shape[-1] * g.shape[-1]:  # ghost: ||G^T A||_F^2 = <G G^T, A A^T>
            gram = torch.bmm(g, g.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))
            norms[layer.weight] = gram.sum(dim=(1, 2)).clamp(min=0).sqrt()
        else:
            norms[layer.weight] = torch.bmm(g.transpose(1, 2), a).flatten(1).norm(dim=1)
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = g.sum(dim=1).norm(dim=1)
    return norms


def conv2d_norm_sample(layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor) -> Samples:
    """Per-sample gradient norms of a Conv2d (mixed ghost clipping over its output positions).

    Ghost: ||G A^T||_F^2 = <G^T G, A^T A> with the unfolded input A (n, in*k*k, L) and output
    gradient G (n, out, L), when L*L is smaller than the kernel; otherwise the per-sample kernel
    gradient itself. Depthwise and grouped convs use their per-sample gradients.
    """
    if layer.groups != 1:
        return {p: g.flatten(1).norm(dim=1) for p, g in conv2d_grad_sample(layer, activations, backprops).items()}
    x = activations[0].to(backprops.dtype).contiguous()
    n = x.shape[0]
    a = unfold2d(x, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride, dilation=layer.dilation)
    g = backprops.reshape(n, backprops.shape[1], -1)
    positions = g.shape[-1]
    norms: Samples = {}
    if layer.weight.requires_grad:
        if positions * positions <= a.shape[1] * g.shape[1]:
            gram = torch.bmm(g.transpose(1, 2), g) * torch.bmm(a.transpose(1, 2), a)
            norms[layer.weight] = gram.sum(dim=(1, 2)).clamp(min=0).sqrt()
        else:
            norms[layer.weight] = torch.bmm(g, a.transpose(1, 2)).flatten(1).norm(dim=1)
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = g.sum(dim=2).norm(dim=1)
    return norms


def register() -> None:
    """Install the samplers in Opacus's registries (idempotent)."""
    samplers = {nn.Conv2d: conv2d_grad_sample, LayerNorm: compute_layer_norm_grad_sample,
                LayerNorm2d: layer_norm_2d_grad_sample, ChannelScale: channel_scale_grad_sample}
    GradSampleModule.GRAD_SAMPLERS.update(samplers)
    GradSampleModuleFastGradientClipping.NORM_SAMPLERS.update({nn.Linear: linear_norm_sample, nn.Conv2d: conv2d_norm_sample})


register()
