"""What trainer rank 0 tells the other ranks: a command (op, step) and, for a training or evaluation
step, the batch as flat tensors (the others rebuild the samples and the teacher outputs from them).

Commands travel through the process group's store (:class:`Commands`), not a collective: rank 0 may wait
far longer between two commands than the group's timeout (a weight version the rollout waits for, a
service restarting a worker, a channel re-forming) and the other ranks must not give up meanwhile; they
poll the store for the next command, then take part in its collectives, which follow at once."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from gkd.rollout.types import FINISH_REASONS, Sample
from gkd.teacher.types import TeacherOutput

OP_TRAIN, OP_SAVE, OP_STOP, OP_SYNC, OP_EXPORT, OP_EVAL = 0, 1, 2, 3, 4, 5


def broadcast_tensor(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    moved = t.to(device)
    dist.broadcast(moved, src=0)
    return moved.cpu()


def broadcast_batch(
    samples: Sequence[Sample] | None, outputs: Sequence[TeacherOutput] | None, device
) -> tuple[list[Sample], list[TeacherOutput]]:
    """Rank 0 sends ``OP_TRAIN`` + the batch as flat tensors; the others (``samples=None``) receive it.
    Call after the other ranks have read the command header."""
    if samples is not None:
        assert outputs is not None
        k = max(int(o.topk_ids.shape[1]) for o in outputs)
        meta = torch.tensor(
            [
                [
                    len(s.prompt_ids),
                    len(s.response_ids),
                    int(s.policy_version),
                    FINISH_REASONS.index(s.finish_reason),
                ]
                for s in samples
            ],
            dtype=torch.int64,
        )  # [B, 4]
        tokens = torch.tensor(
            [t for s in samples for t in [*s.prompt_ids, *s.response_ids]], dtype=torch.int64
        )  # [sum(P + R)]
        r_lp = torch.cat([s.response_logprobs.float() for s in samples])  # [sum R]
        padded = [o.padded(k) for o in outputs]  # teachers answering with fewer columns: unused slots
        t_ids = torch.cat([ids for ids, _ in padded])  # [sum R, K]
        t_lp = torch.cat([lp for _, lp in padded])
        t_tok = torch.cat([o.token_logprobs.float() for o in outputs])  # [sum R]
        sizes = torch.tensor([len(samples), tokens.numel(), r_lp.numel(), k], dtype=torch.int64)
    else:
        sizes = torch.zeros(4, dtype=torch.int64)
    sizes = broadcast_tensor(sizes, device)
    b, n_tok, n_resp, k = sizes.tolist()
    if samples is None:
        meta = torch.empty(b, 4, dtype=torch.int64)
        tokens = torch.empty(n_tok, dtype=torch.int64)
        r_lp, t_tok = torch.empty(n_resp), torch.empty(n_resp)
        t_ids, t_lp = torch.empty(n_resp, k, dtype=torch.int32), torch.empty(n_resp, k)
    meta, tokens, r_lp, t_ids, t_lp, t_tok = (
        broadcast_tensor(x, device) for x in (meta, tokens, r_lp, t_ids, t_lp, t_tok)
    )
    if samples is not None:
        return list(samples), list(outputs)
    out_s, out_t, tok_at, resp_at = [], [], 0, 0
    for p, r, version, finish in meta.tolist():
        ids = tokens[tok_at : tok_at + p + r].tolist()
        span = slice(resp_at, resp_at + r)
        out_s.append(Sample(ids[:p], ids[p:], r_lp[span].clone(), FINISH_REASONS[finish], version))
        out_t.append(TeacherOutput(t_ids[span].clone(), t_lp[span].clone(), t_tok[span].clone()))
        tok_at, resp_at = tok_at + p + r, resp_at + r
    return out_s, out_t


class Commands:
    """Rank 0's commands, numbered, as keys of the default group's store (``gkd/cmd/<n>``); the others
    poll for the next number (``store.check``, backing off from 1 ms to ``max_poll_s``: no wait times out,
    whatever rank 0 waits for). Every command but ``STOP`` is followed by a collective, so when rank 0
    sends command n every rank has read n - 2, which is deleted. Another rank asks rank 0 to stop (it got
    SIGTERM / SIGINT) with :meth:`ask_stop`; rank 0 sees it with :meth:`stop_asked`."""

    STOP_KEY = "gkd/stop_asked"

    def __init__(self, store=None, *, max_poll_s: float = 0.05) -> None:
        import torch.distributed.distributed_c10d as c10d

        self.store = store if store is not None else c10d._get_default_store()
        self.seq, self.max_poll_s, self._asked = 0, max_poll_s, False

    def send(self, op: int, step: int = 0) -> None:
        self.store.set(f"gkd/cmd/{self.seq}", f"{op} {step}")
        if self.seq >= 2:
            self.store.delete_key(f"gkd/cmd/{self.seq - 2}")
        self.seq += 1

    def receive(self, idle: Callable[[], None] | None = None) -> tuple[int, int]:
        """The next command; ``idle()`` is called between polls (e.g. to pass on a stop request)."""
        key, pause = f"gkd/cmd/{self.seq}", 0.001
        while not self.store.check([key]):
            if idle is not None:
                idle()
            time.sleep(pause)
            pause = min(2 * pause, self.max_poll_s)
        op, step = self.store.get(key).decode().split()
        self.seq += 1
        return int(op), int(step)

    def ask_stop(self) -> None:
        if not self._asked:
            self.store.set(self.STOP_KEY, "1")
            self._asked = True

    def stop_asked(self) -> bool:
        return self.store.check([self.STOP_KEY])
