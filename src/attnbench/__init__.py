"""attnbench: which attention mechanism gives a small byte-level language model the best quality for its cost.

The stage commands are cli.py's (python -m attnbench --help); the modules each pipeline stage runs are listed in
sources.STAGE_MODULES. The variants live in variants/, one file each, imported (and so registered) by variants/__init__.py.
"""
