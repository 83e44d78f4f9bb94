"""The weight channel: moving the trainer's weights to every rollout worker in bulk, single-shot transfers.

Owns: flat byte buffers and bucket plans (``flat``), the compiled extension's bridge with its torch
fallbacks (``native``), the channel's process group, protocol constants and per-bucket trailer
(``wire``), its membership token and signed store values (``membership``), the generations of members
that re-form when a worker dies or joins (``channel``), and the sender and receiver (``transfer``).
May import: nothing of gkd but ``gkd._C`` (the compiled extension, through ``native``).

    from gkd.weights import init_weight_group, WeightSender, WeightReceiver

The names below resolve on first use (PEP 562): importing the package loads no torch.
"""

from gkd._lazy import lazy_names

__getattr__, __all__ = lazy_names(
    __name__,
    {
        "channel": ("ChannelHost", "ChannelMember", "ChannelMismatch", "member_id"),
        "flat": ("Bucket", "FlatBuffer", "TensorMeta", "plan_buckets"),
        "transfer": (
            "ChannelReform",
            "WeightGroup",
            "WeightReceiver",
            "WeightSender",
            "WeightSyncError",
            "init_weight_group",
            "named_weights",
        ),
    },
)
