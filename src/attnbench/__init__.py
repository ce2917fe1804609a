"""attnbench: which attention mechanism gives a small byte-level language model the best quality for its cost.

The stages (python -m attnbench --help) are the modules named in sources.STAGE_MODULES; the variants live in
variants/, one file each, listed in variants/__init__.py's REGISTRY.
"""
