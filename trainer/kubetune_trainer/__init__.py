"""kubetune's trainer: runs a resolved CustomizationJob (`python -m kubetune_trainer --config job.json`)."""

__version__ = "0.1.0"
