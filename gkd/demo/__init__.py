"""``gkd demo``: a real teacher (SmolLM2-135M-Instruct, from a PyPI wheel) distilled into a layer-pruned
student on CPU, end to end. See :mod:`gkd.demo.run`."""
