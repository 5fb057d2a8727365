"""Scale-out on Ray (the optional ``ray`` extra): embedding spread over a cluster's workers
(:mod:`mmsearch.scale.embed`), and an IVF-PQ index built and searched as shards
(:mod:`mmsearch.scale.shards`). Nothing here is imported by the single-machine path.
"""

from __future__ import annotations

from mmsearch.errors import MmsearchError


class RayMissingError(MmsearchError, ImportError):
    """Ray is not installed, and something asked for it."""


class ScaleError(MmsearchError, RuntimeError):
    """A run on the cluster did not give back what it was given (nothing was committed)."""


def ray_module():
    """The ray module, or one line saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise RayMissingError(f"--ray needs Ray Data ({e}): pip install 'mmsearch[ray]'") from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None):
    """Join the cluster at ``address`` ("auto", "ray://host:10001"; "local": a new one on this
    machine with ``num_cpus``; None: Ray's rule, i.e. RAY_ADDRESS, else a cluster already running
    on this machine, else a new one), unless this process already is connected. Returns the ray module."""
    ray = ray_module()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 **({"num_cpus": num_cpus} if num_cpus and address == "local" else {}))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the library never prints: the caller reports progress
    ctx.print_on_execution_start = False
    return ray
