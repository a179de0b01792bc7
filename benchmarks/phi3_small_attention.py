"""Phi-3-small's block-sparse attention two ways, forward plus backward, on one sequence: SDPA under the exact dense
mask (what ``phitune.trainer.phi3_small`` runs) against a blocked computation that attends each query block only to
the key blocks the pattern keeps (gathered per block). The real pattern (blocks of 64, 16 local blocks, vertical
stride 8, homogeneous heads here so both sides compute the same thing); fp32; ``--heads`` of 128 dims.

    python benchmarks/phi3_small_attention.py --lengths 1024 2048 4096 --heads 8
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from phitune.trainer.phi3_small.modeling import sparse_attention_mask

BLOCK, LOCAL, STRIDE = 64, 16, 8


def masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(q.shape[2])[None]
    mask = sparse_attention_mask(positions, positions, [0], block_size=BLOCK, local_blocks=LOCAL, vert_stride=STRIDE)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[0])


def blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    blocks = -(-q.shape[2] // BLOCK)
    outputs = []
    for qb in range(blocks):
        kept = [kb for kb in range(qb + 1) if qb - kb < LOCAL or (kb + 1) % STRIDE == 0]
        index = torch.cat([torch.arange(kb * BLOCK, min((kb + 1) * BLOCK, k.shape[2])) for kb in kept])
        rows = slice(qb * BLOCK, min((qb + 1) * BLOCK, q.shape[2]))
        causal = index[None, :] <= torch.arange(rows.start, rows.stop)[:, None]
        outputs.append(F.scaled_dot_product_attention(q[:, :, rows], k[:, :, index], v[:, :, index], attn_mask=causal))
    return torch.cat(outputs, dim=2)


def timed(function: object, length: int, heads: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        q, k, v = (torch.randn(1, heads, length, 128, requires_grad=True) for _ in range(3))
        start = time.perf_counter()
        function(q, k, v).sum().backward()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    q, k, v = (torch.randn(1, 2, 300, 128) for _ in range(3))
    assert torch.allclose(masked(q, k, v), blocked(q, k, v), atol=1e-5)
    rows = []
    for length in args.lengths:
        dense, sparse = timed(masked, length, args.heads, args.repeat), timed(blocked, length, args.heads, args.repeat)
        rows.append({"tokens": length, "mask_s": round(dense, 4), "blocked_s": round(sparse, 4)})
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
