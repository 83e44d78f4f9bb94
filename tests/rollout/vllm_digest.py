"""A test-only vLLM worker extension (``worker_extension_cls``) on top of gkd's weight receiver: it keeps a
SHA-256 per tensor of the last version the worker loaded, and reads back the parameters vLLM's CPU backend
keeps in checkpoint form (the embedding and the norms; its linear weights become oneDNN handles), so a test
in another process can compare them with the trainer's bit for bit. Imported by name inside vLLM's worker
process (``tests.rollout.vllm_digest.DigestExtension``)."""

from __future__ import annotations

import hashlib
import os

import torch

from gkd.rollout.vllm_worker import WeightReceiverExtension

EXTENSION = "tests.rollout.vllm_digest.DigestExtension"


def digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    flat = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    h = hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode())
    h.update(flat.numpy().tobytes())
    return h.hexdigest()


class DigestExtension(WeightReceiverExtension):
    def _gkd_load(self, weights):
        self._gkd_digests = {name: digest(t) for name, t in weights}
        return super()._gkd_load(weights)

    def gkd_pid(self) -> int:
        return os.getpid()

    def gkd_loaded_digests(self) -> dict[str, str]:
        return getattr(self, "_gkd_digests", {})

    def gkd_plain_digests(self) -> dict[str, str]:
        """The model's parameters that hold checkpoint tensors unchanged, by vLLM name."""
        model = self.model_runner.get_model()
        return {
            name: digest(p)
            for name, p in model.named_parameters()
            if p.numel() and ("norm" in name or "embed_tokens" in name)
        }
