"""A small, named-synthetic workload for the distillation losses (the main job until `gkd demo` exists).

A random "teacher" distribution is distilled into a linear student head with
``fused_linear_topk_distill_loss`` for a few hundred Adam steps; the full-vocabulary KL(teacher || student)
printed every 50 steps falls. Run: ``.venv/bin/python examples/losses_demo.py``.
"""

import time

import torch

from gkd.kernels import fused_linear_topk_distill_loss


def main(n=512, hidden_size=64, vocab=4096, k=32, steps=300, seed=0):
    torch.manual_seed(seed)
    hidden = torch.randn(n, hidden_size)
    teacher_logp = torch.log_softmax(hidden @ torch.randn(vocab, hidden_size).t() * 0.5, dim=-1)  # [N, V]
    top_lp, top_ids = teacher_logp.topk(k, dim=-1)  # what a teacher service would send
    weight = torch.nn.Parameter(torch.randn(vocab, hidden_size) * 0.01)
    opt = torch.optim.Adam([weight], lr=3e-2)

    def full_kl():
        with torch.no_grad():
            student_logp = torch.log_softmax(hidden @ weight.t(), dim=-1)
            return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean().item()

    print(
        f"synthetic workload: N={n} H={hidden_size} V={vocab} K={k}; teacher top-{k} mass "
        f"{top_lp.exp().sum(-1).mean():.3f}"
    )
    t0 = time.perf_counter()
    for step in range(steps + 1):
        if step % 50 == 0:
            print(f"step {step:4d}  full-vocabulary KL(teacher||student) = {full_kl():.4f}")
        if step == steps:
            break
        loss = fused_linear_topk_distill_loss(hidden, weight, top_ids, top_lp, reduction="mean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"{steps} steps in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
