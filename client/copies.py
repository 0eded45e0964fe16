"""Host copies on the calling thread alone: a large torch copy from one of hcache's threads starts OpenMP workers of
its own, which take (and spin on) the cores the model decodes on; measured here, they used as much CPU as the
copies themselves."""

import numpy as np
import torch

_SAME_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_array(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor of any dtype (bfloat16 as int16 bits), strides kept."""
    return t.view(_SAME_SIZE[t.element_size()]).numpy()


def cat_into(parts: list[torch.Tensor], dim: int, out: torch.Tensor) -> torch.Tensor:
    """torch.cat(parts, dim, out=out) for host tensors of one dtype."""
    np.concatenate([as_array(p) for p in parts], axis=dim, out=as_array(out))
    return out
