"""Modules of `scripts/bench`: the table (table.py), kernel plumbing (kernels.py), process
memory (procs.py) and the probes, one module per section (probes_*.py)."""
