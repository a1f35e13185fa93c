"""`auditbench run`: the entry point of the pipeline (``auditbench.pipeline``)."""
from auditbench.pipeline.runner import Runner, run_protocol

__all__ = ["Runner", "run_protocol"]
