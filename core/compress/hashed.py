"""Hashed weight sharing (HashedNets, Chen et al. 2015): a weight tensor drawn from a smaller pool.

Each element (linear position n) of a virtual weight tensor reads one of K shared values,
`pool[bucket(n)] * sign(n)`, with bucket and sign from a fixed hash of (seed, n). Only the K
pool values are parameters and only they are saved, so a tensor of N elements costs N / K times
fewer parameters and bytes on disk: the compression factor. The sign hash (HashedNets' xi) makes
the collisions inside a bucket cancel in expectation instead of adding up.

`HashedWeight` is a torch parametrization (torch.nn.utils.parametrize), so it stands in for any
weight without a new layer class: an nn.Linear's or nn.Conv's weight, an nn.LSTM's weight_ih /
weight_hh (RNNBase.forward re-reads its weights when they are new tensors, as a
parametrized weight is on every call), or
the stacked expert weights w_in / w_out of core.experts.Experts (all experts share one pool).
Assigning a dense weight projects it onto the pool (least squares: each pool value is the mean
of the signed elements of its bucket), the start for fine-tuning a trained dense model.
`materialize` turns the parametrized tensors back into plain dense ones for ONNX export and
INT8 quantization, which then see an ordinary model.

The buckets (int64, one per virtual element) are rebuilt from (shape, seed) at construction, not
stored: a hashed model folder holds the pool only. The hash is SplitMix64's finaliser, a
well-mixed 64-bit integer hash (HashedNets used xxHash; any such hash serves).
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

MASK64 = (1 << 64) - 1


def splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser over uint64 values (wrapping arithmetic)."""
    z = (values + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(MASK64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def buckets_and_signs(numel: int, pool_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bucket (numel,) int64 in [0, pool_size), sign (numel,) float32 of +-1) for positions 0..numel-1."""
    with np.errstate(over="ignore"):
        key = np.arange(numel, dtype=np.uint64) ^ (np.uint64(seed & 0xFFFFFFFF) << np.uint64(32))
        mixed = splitmix64(key)
        bucket = (mixed % np.uint64(pool_size)).astype(np.int64)
        sign = 1.0 - 2.0 * ((splitmix64(mixed) >> np.uint64(63)).astype(np.float32))  # an independent bit
    return torch.from_numpy(bucket), torch.from_numpy(sign)


def pool_size_for(numel: int, compression: float) -> int:
    """Pool values for a tensor of `numel` elements at `compression` (virtual / real parameters)."""
    return max(1, math.ceil(numel / compression))


class HashedWeight(nn.Module):
    """Parametrization: pool (K,) -> virtual weight of `shape` (see the module docstring).

    Args:
        shape: the virtual weight's shape.
        compression: virtual elements per pool value (>= 1); the pool holds ceil(numel / compression).
        seed: picks the hash; give each tensor its own so that their bucket patterns differ.
    """

    def __init__(self, *, shape: tuple[int, ...], compression: float, seed: int) -> None:
        super().__init__()
        if not compression >= 1:
            raise ValueError(f"HashedWeight: compression must be >= 1, got {compression!r}")
        self.shape = tuple(shape)
        numel = math.prod(self.shape)
        self.pool_size = pool_size_for(numel, compression)
        bucket, sign = buckets_and_signs(numel, self.pool_size, seed)
        # Rebuilt from (shape, seed) on every construction: not saved with the weights.
        self.register_buffer("bucket", bucket, persistent=False)
        self.register_buffer("sign", sign, persistent=False)

    @property
    def compression(self) -> float:
        """The achieved factor: virtual elements / pool values."""
        return math.prod(self.shape) / self.pool_size

    def forward(self, pool: torch.Tensor) -> torch.Tensor:
        """pool (K,) -> weight (shape)."""
        return (pool.index_select(0, self.bucket) * self.sign.to(pool.dtype)).reshape(self.shape)

    def right_inverse(self, dense: torch.Tensor) -> torch.Tensor:
        """weight (shape) -> the pool closest to it in least squares: each bucket's signed mean."""
        signed = dense.detach().reshape(-1) * self.sign.to(dense.dtype)
        total = torch.zeros(self.pool_size, dtype=dense.dtype).index_add_(0, self.bucket, signed)
        count = torch.bincount(self.bucket, minlength=self.pool_size).clamp_min(1).to(dense.dtype)
        return total / count


def tensor_seed(name: str, seed: int = 0) -> int:
    """A stable per-tensor hash seed from its dotted name (crc32: the same in every process)."""
    return zlib.crc32(name.encode()) ^ seed


def hash_weights(model: nn.Module, names: list[str], *, compression: float, seed: int = 0) -> dict[str, float]:
    """Replace each named parameter ("module.path.weight") of `model` by a HashedWeight pool,
    initialised by projecting the current dense values. Returns {name: achieved compression}."""
    achieved = {}
    for name in names:
        owner_name, _, attribute = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        dense = getattr(owner, attribute)
        hashed = HashedWeight(shape=tuple(dense.shape), compression=compression, seed=tensor_seed(name, seed))
        parametrize.register_parametrization(owner, attribute, hashed, unsafe=True)  # unsafe: the pool's shape differs
        achieved[name] = hashed.compression
    return achieved


def materialize(model: nn.Module) -> nn.Module:
    """Replace, in place, every HashedWeight of `model` by its plain dense weight (for ONNX export
    and INT8 quantization, which then see an ordinary model with as many parameters as before
    hashing); returns `model`. In place: a parametrized nn.LSTM cannot be deep-copied (it holds
    its computed weights), so reload the folder to get the hashed model back."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for attribute in list(module.parametrizations.keys()):
                if any(isinstance(p, HashedWeight) for p in module.parametrizations[attribute]):
                    parametrize.remove_parametrizations(module, attribute, leave_parametrized=True)
    return model


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state_dict with each hashed weight as its plain dense tensor under its own name
    ("layers.0.experts.w_in"), `model` left hashed: load it into the same architecture built without
    hashing to get a dense copy (for ONNX export). Not a deep copy plus `materialize`: a deep copy
    of a parametrized module shares its injected class, and removing the copy's parametrization
    removes the original's too."""
    state = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in f".{k}"}
    for prefix, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for attribute in module.parametrizations.keys():
                state[f"{prefix}.{attribute}" if prefix else attribute] = getattr(module, attribute).detach().clone()
    return state


def hashed_parameters(model: nn.Module) -> tuple[int, int]:
    """(pool values, virtual elements) over every HashedWeight of `model`."""
    pool = virtual = 0
    for module in model.modules():
        if isinstance(module, HashedWeight):
            pool += module.pool_size
            virtual += math.prod(module.shape)
    return pool, virtual
