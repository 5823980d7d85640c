"""FP8 matmuls for the U-Net's big linear layers (Hopper / Ada: compute capability ≥ 8.9).

:func:`convert_unet_to_fp8` replaces the large ``nn.Linear`` layers of the transformers (spatial
attention projections, the audio cross-attention's query/output, the motion modules' projections
and every feed-forward) by :class:`FP8Linear`; convolutions, the time embedding and the small
audio key/value projections (50 tokens per frame) stay as they are.

Quantisation (float8 e4m3: 3 mantissa bits, largest value 448):

- weights once, at conversion: ``w ≈ w8 · sw`` with ``sw = amax / 448`` per output row
  (``granularity="row"``) or for the whole matrix (``"tensor"``);
- activations on every call, dynamically: ``x ≈ x8 · sx``, ``sx = amax / 448`` per row (token)
  or for the whole input;
- ``y = (x8 @ w8ᵀ) · sx · sw + bias``: ``torch._scaled_mm`` on the GPU (fp32 accumulation,
  bf16/fp16 out). Row-wise scaling needs a bf16 model; fp16 models use ``"tensor"``.

The arithmetic is written so the CPU can check it: :func:`quantize` / :func:`dequantize` are
plain torch, :func:`scaled_mm_reference` computes what ``torch._scaled_mm`` computes (in fp32,
from the same fp8 operands and scales), and ``FP8Linear(emulate=True)`` uses it instead of the
kernel. On the GPU the module's only extra step is the ``torch._scaled_mm`` call.
"""

from __future__ import annotations

import torch
from torch import nn

from lipsync.errors import ConfigError

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
GRANULARITIES = ("row", "tensor")
_EPS = 1e-12  # smallest amax: an all-zero input still gets a finite scale


def require_fp8_device(device: torch.device | str) -> None:
    """ConfigError unless ``device`` is a CUDA GPU with FP8 tensor cores (capability ≥ 8.9)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ConfigError(
            f"FP8 needs an NVIDIA GPU with compute capability 8.9 or newer (Ada, Hopper); "
            f"the model is on {device.type}"
        )
    if not torch.cuda.is_available():
        raise ConfigError("FP8 needs a CUDA GPU, but CUDA is not available")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(
            f"FP8 needs compute capability 8.9 or newer (Ada, Hopper); {name} has {major}.{minor}"
        )


def quantize(x: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (m, k) -> (x8 (m, k) float8_e4m3fn, scale float32: (m, 1) per row, or () for the whole
    tensor) with x ≈ x8 · scale; the largest magnitude (per row) maps to 448."""
    amax = x.abs().amax(dim=-1, keepdim=True) if per_row else x.abs().amax()
    scale = amax.float().clamp(min=_EPS) / FP8_MAX
    x8 = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x8, scale


def dequantize(x8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x8 (m, k) float8 and its scale ((m, 1), (1, m)ᵀ-shaped or ()) -> float32 (m, k)."""
    return x8.float() * scale.reshape(-1, 1) if scale.numel() > 1 else x8.float() * scale


def scaled_mm_reference(
    x8: torch.Tensor,
    x_scale: torch.Tensor,
    w8: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """What ``torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale)`` computes:
    x8 (m, k), w8 (n, k) float8; x_scale () or (m, 1); w_scale () or (1, n) -> (m, n)."""
    out = (x8.float() @ w8.float().t()) * x_scale * w_scale
    return out.to(out_dtype)


class FP8Linear(nn.Module):
    """``nn.Linear`` with float8 e4m3 weights and dynamically quantised fp8 activations.

    Buffers: ``weight`` (out, in) float8_e4m3fn, ``weight_scale`` (1, out) float32 per row or
    () per tensor, ``bias`` (out,) in the model's dtype or None. ``emulate=True`` computes the
    matmul with :func:`scaled_mm_reference` (any device; for tests) instead of the FP8 kernel.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        granularity: str = "row",
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        emulate: bool = False,
    ):
        super().__init__()
        if granularity not in GRANULARITIES:
            choices = ", ".join(GRANULARITIES)
            raise ConfigError(f"unknown FP8 granularity {granularity!r}; choose one of: {choices}")
        self.in_features, self.out_features = in_features, out_features
        self.granularity = granularity
        self.emulate = emulate
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=FP8, device=device)
        )
        scale_shape = (1, out_features) if granularity == "row" else ()
        self.register_buffer("weight_scale", torch.ones(scale_shape, device=device))
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, granularity: str = "row", emulate: bool = False
    ) -> FP8Linear:
        """Quantise ``linear``'s weight once (its bias keeps the linear's dtype)."""
        w = linear.weight.detach()
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            granularity,
            dtype=w.dtype,
            device=w.device,
            emulate=emulate,
        )
        w8, scale = quantize(w, per_row=granularity == "row")  # scale (out, 1) or ()
        module.weight.copy_(w8)
        module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, granularity={self.granularity}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in_features) in bf16/fp16 -> (..., out_features) in x's dtype
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        x8, x_scale = quantize(x2, per_row=self.granularity == "row")
        if self.emulate:
            y = scaled_mm_reference(x8, x_scale, self.weight, self.weight_scale, x.dtype)
        else:
            y = torch._scaled_mm(
                x8,
                self.weight.t(),  # (in, out), column-major as the kernel wants
                scale_a=x_scale,
                scale_b=self.weight_scale,
                out_dtype=x.dtype,
                use_fast_accum=True,
            )
        if self.bias is not None:
            y = y + self.bias  # added outside the kernel: not every scaling mode fuses a bias
        return y.reshape(*shape[:-1], self.out_features)


# Linear layers left in high precision: the audio keys/values see only 50 tokens per frame.
_SKIP_SUFFIXES = ("attn2.to_k", "attn2.to_v")


def fp8_candidates(unet: nn.Module, min_features: int = 128) -> list[str]:
    """Names of the linear layers :func:`convert_unet_to_fp8` converts: inside the spatial
    transformers (``attentions``) and motion modules, both sizes ≥ ``min_features`` and
    multiples of 16 (a kernel requirement), not the audio key/value projections."""
    names = []
    for name, module in unet.named_modules():
        if not isinstance(module, nn.Linear) or name.endswith(_SKIP_SUFFIXES):
            continue
        if ".attentions." not in name and ".motion_modules." not in name:
            continue
        k, n = module.in_features, module.out_features
        if min(k, n) >= min_features and k % 16 == 0 and n % 16 == 0:
            names.append(name)
    return names


def convert_unet_to_fp8(
    unet: nn.Module,
    granularity: str | None = None,
    min_features: int = 128,
    emulate: bool = False,
) -> list[str]:
    """Replace the U-Net's big linear layers by :class:`FP8Linear`, in place; returns their names.

    Needs the model on a CUDA GPU with compute capability ≥ 8.9 (ConfigError otherwise) unless
    ``emulate`` (tests). ``granularity``: ``"row"`` (default for bf16 models) or ``"tensor"``
    (default, and the only choice, for fp16). Convert before ``torch.compile``.
    """
    param = next(unet.parameters())
    if not emulate:
        require_fp8_device(param.device)
    dtype = param.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError(f"FP8 layers need a bf16 or fp16 model, this one is {dtype}")
    granularity = granularity or ("row" if dtype == torch.bfloat16 else "tensor")
    if granularity == "row" and dtype != torch.bfloat16:
        raise ConfigError("row-wise FP8 scaling needs a bf16 model; use granularity='tensor'")
    names = fp8_candidates(unet, min_features)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name)
        setattr(parent, child, FP8Linear.from_linear(getattr(parent, child), granularity, emulate))
    return names


def has_fp8(module: nn.Module) -> bool:
    return any(isinstance(m, FP8Linear) for m in module.modules())
