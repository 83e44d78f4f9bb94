"""What a run reports: the per-step metrics and their files, W&B (``records``), the hardware's peak FLOP/s
for MFU (``flops``), and the timeline picture of the overlapped phases (``timeline``). May import:
``gkd.config``, ``gkd.services`` (its input checks).
"""
