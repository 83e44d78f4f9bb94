"""What a run reads: prompts and their loader (``prompts``), dataset sources and mixtures (``sources``),
Hugging Face hub ids of models and datasets resolved to local folders (``hub``), and tokenizers and
vocabulary checks (``vocab``). May import: ``gkd.config``.
"""
