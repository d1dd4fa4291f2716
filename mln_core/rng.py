"""Counter-based random numbers: every value is a pure function of its keys.

A task, a perturbation or a minibatch is addressed by integers (seed, stream,
index, position) and hashed with SplitMix64. So any worker can regenerate any
piece without shared generator state, and a batch of T tasks is drawn in one
vectorised call. Integer hashing is exact on every device; the float
transforms (log, cos) agree bitwise between CPU runs of the same torch build.
"""

from __future__ import annotations

import torch

_MASK_BY_SHIFT = {shift: (1 << (64 - shift)) - 1 for shift in (27, 30, 31, 33, 40)}


def _shift_right(x: torch.Tensor, shift: int) -> torch.Tensor:
    # torch shifts int64 arithmetically; masking makes it a logical shift.
    return (x >> shift) & _MASK_BY_SHIFT[shift]


def _to_int64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _to_int64(0x9E3779B97F4A7C15)
_MIX1 = _to_int64(0xBF58476D1CE4E5B9)
_MIX2 = _to_int64(0x94D049BB133111EB)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """Hash int64 values with the SplitMix64 finaliser (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def fold_keys(*keys: torch.Tensor | int, device: torch.device | str | None = None) -> torch.Tensor:
    """Combine integer keys into one int64 key per element (keys broadcast)."""
    tensors = [torch.as_tensor(k, dtype=torch.int64, device=device) for k in keys]
    key = torch.zeros((), dtype=torch.int64, device=tensors[0].device)
    for k in tensors:
        key = mix64(key ^ k.to(key.device))
    return key


def uniform(key: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Draw uniforms in (0, 1) of shape ``[*key.shape, *shape]``, float32."""
    count = 1
    for size in shape:
        count *= size
    positions = torch.arange(count, dtype=torch.int64, device=key.device).reshape(shape)
    bits = mix64(key.reshape(key.shape + (1,) * len(shape)) ^ mix64(positions))
    # The top 24 bits fit a float32 mantissa exactly; +0.5 keeps 0 and 1 out.
    return (_shift_right(bits, 40).to(torch.float32) + 0.5) / float(1 << 24)


def normal(key: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Draw standard normals of shape ``[*key.shape, *shape]`` (Box-Muller), float32."""
    u1 = uniform(mix64(key ^ 1), shape)
    u2 = uniform(mix64(key ^ 2), shape)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)


def integers(key: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Draw one integer in the inclusive range [low, high] per key, int64."""
    u = uniform(key, ())
    return (low + torch.floor(u * (high - low + 1))).to(torch.int64).clamp_(low, high)
