"""Converters: models and checkpoints made elsewhere -> lmm model directories (and back where the architecture
matches). Each source has its own module; the `lmm convert` / `lmm export` commands call them."""
