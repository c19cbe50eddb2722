"""Triton kernels and their launchers, one file per op family. Imported lazily: ``triton`` is optional."""
