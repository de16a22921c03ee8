"""The worker engine: claim jobs, run attempts, record outcomes, keep leases alive."""

from conveyor.engine.worker import Worker

__all__ = ["Worker"]
