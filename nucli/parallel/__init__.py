"""Running per-tile work on many cores and machines: the one place that knows Dask.

A :class:`Runner` is made once per command from its options (:func:`make_runner`)
and passed to the library function that needs it; nothing here is global.
Modes:

* ``serial``: this process. Reading, the model and post-processing overlap in a
  small thread pipeline (a reader thread loads batch k+1 and a post-processing
  thread finishes batch k-1 while the model runs batch k), with bounded queues.
* ``local``: a ``dask.distributed`` LocalCluster on 127.0.0.1 with ``--workers``
  processes of ``--threads`` threads each.
* ``scheduler``: an existing ``dask.distributed`` scheduler (``--scheduler
  tcp://host:port`` or a scheduler JSON file); its workers must see the run
  store at the same path and have nucli installed.
* ``slurm``: a dask-jobqueue ``SLURMCluster`` built from ``--cluster-config``.

Work is a list of :class:`Batch` es (tile indices of equal in-image size) and a
:class:`TileJob` that loads, computes and writes one batch. In the Dask modes
each batch is one task that reads its tiles from the Zarr run store, runs the
method and writes the results back into the store on the worker; the client
only receives tile counts. At most ``max_in_flight`` batches are submitted at a
time (backpressure), so memory does not grow with the slide. The method is built
once per worker process from a :class:`MethodRecipe` (cached by method name and
weights hash) or, for a method object without a recipe, sent once per worker.

Also here: :class:`Shard` (``--shard i/n``: every n-th tile, so independent
processes fill one store) and :class:`StoreLock` (two writers of one store
without ``--shard`` is an error; a lock left by a dead process is taken over).
"""

from nucli.parallel.locks import StoreLock, setup_lock
from nucli.parallel.runner import MODES, MethodRecipe, Runner, cached_method, make_runner, method_builds
from nucli.parallel.slurm import load_cluster_config, slurm_cluster
from nucli.parallel.work import Batch, Shard, TileJob, plan_batches

__all__ = [
    "MODES", "Batch", "MethodRecipe", "Runner", "Shard", "StoreLock", "TileJob", "cached_method",
    "load_cluster_config", "make_runner", "method_builds", "plan_batches", "setup_lock", "slurm_cluster",
]
