"""auditbench: explainability audits of chest X-ray classifiers (accuracy vs Grad-CAM attention)."""

__version__ = "0.1.0"
