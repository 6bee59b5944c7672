"""Watch the payload: memory, CPU, looping, disk, walltime, outbound connections."""

from pilot.monitor.connections import ConnectionPolicy, ConnectionWatch, PolicyMode
from pilot.monitor.limits import Limits
from pilot.monitor.sampler import Sample, Sampler
from pilot.monitor.watch import DEFAULT_INTERVAL, JobMonitor

__all__ = [
    "DEFAULT_INTERVAL",
    "ConnectionPolicy",
    "ConnectionWatch",
    "JobMonitor",
    "Limits",
    "PolicyMode",
    "Sample",
    "Sampler",
]
