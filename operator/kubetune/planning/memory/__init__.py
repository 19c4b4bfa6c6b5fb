"""The GPU memory pre-flight: `estimate` (how much one GPU of a job needs) and `verdict`
(whether that fits the cluster's GPUs, and what to change when it does not)."""
