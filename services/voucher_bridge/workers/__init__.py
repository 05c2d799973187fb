"""Worker processes that run the commands of the service's partitions (see `pool`)."""

from voucher_bridge.workers.pool import WorkerFailed, WorkerLost, WorkerPool, worker_count

__all__ = ["WorkerFailed", "WorkerLost", "WorkerPool", "worker_count"]
