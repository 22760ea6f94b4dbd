"""Single-thread CPU cost of the pieces of fastpadim's Gaussian (update, factorisation, Mahalanobis) against
alternatives, on random data of the bottle 256 px shape (B=32 images, P=4096 positions, D=176).

    PYTHONPATH=src python benchmarks/micro_gaussian.py
"""

import time

import torch

from fastpadim.gaussian import GaussianStats, mahalanobis

torch.set_num_threads(1)  # CPU time = the work, even on a shared machine
torch.manual_seed(0)
B, P, D = 32, 4096, 176


def cpu(name, fn):
    start = time.process_time()
    result = fn()
    print(f"| {name} | {time.process_time() - start:.2f} |", flush=True)
    return result


x = torch.randn(B, D, P).transpose(1, 2)  # (B, P, D) with the strides _embed produces
print("| operation (one batch of 32, or one factorisation) | s CPU, 1 thread |\n|---|---|")
stats = GaussianStats.empty(P, D)
cpu("GaussianStats.update, first batch", lambda: stats.update(x))
cpu("GaussianStats.update, later batch (adds the rank-1 merge term)", lambda: stats.update(x))
centred = (x - x.mean(0)).permute(1, 2, 0)
cpu("  bmm on the permuted (P, D, B) view", lambda: torch.bmm(centred, centred.transpose(1, 2)))
contiguous = cpu("  .contiguous() of that view", lambda: centred.contiguous())
block = cpu("  bmm on a contiguous (P, D, B)", lambda: torch.bmm(contiguous, contiguous.transpose(1, 2)))
scatter64 = torch.zeros(P, D, D, dtype=torch.float64)
cpu("  float64 scatter += block.double()", lambda: scatter64.add_(block.double()))
scatter32 = torch.zeros(P, D, D)
cpu("  alternative: float32 scatter.baddbmm_ in place (no temporary)", lambda: scatter32.baddbmm_(contiguous, contiguous.transpose(1, 2)))
cpu("GaussianStats.whitener (float64 Cholesky + triangular inverse)", lambda: stats.whitener(0.01))
cov32 = (scatter32 / (2 * B - 1)) + 0.01 * torch.eye(D)
chol32 = cpu("  alternative: float32 cholesky_ex", lambda: torch.linalg.cholesky_ex(cov32)[0])
cpu("  alternative: float32 solve_triangular for the inverse", lambda: torch.linalg.solve_triangular(chol32, torch.eye(D).expand_as(chol32), upper=False))
w = stats.whitener(0.01)
mean = stats.mean.float()
cpu("mahalanobis, batch of 32 (bmm P x (D x D) @ (D x B))", lambda: mahalanobis(x, mean, w))
