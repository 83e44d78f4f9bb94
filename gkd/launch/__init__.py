"""One node's launcher, ``gkd train``: the plan of GPUs and threads (``placement``), the checks before any
child starts (``preflight``), the children's commands, start and watch (``run``), stopping and resuming
(``stop``), the console's filtered output (``console``), and several nodes: node specs and Slurm host
lists (``nodes``), the roster the launchers form (``roster``), and the multi-node plan (``multinode``).
May import every part below it (config to trainer); nothing below imports it.
"""
