"""``gkd demo``: a real teacher (SmolLM2-135M-Instruct, from a PyPI wheel) distilled into a layer-pruned
student on CPU, end to end: the cached models (``models``), the run (``run``), its tables (``report``), the
random models of ``--tiny`` (``tiny``). See :mod:`gkd.demo.run`. May import every part but the API and
the command line (it measures with :mod:`gkd.evaluate` and runs :mod:`gkd.launch`)."""
