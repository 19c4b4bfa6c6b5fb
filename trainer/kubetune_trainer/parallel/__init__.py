"""Model parallelism for the automodel backend: the device mesh and the TP/PP/CP/EP plans."""
