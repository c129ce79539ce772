"""metal-marlin worker: the one process that owns MLX.

It runs quantization jobs claimed from the job store (each in a child process, see
:mod:`worker.runner`) and serves generation from lazily loaded models (see
:mod:`worker.generation`) over a small internal HTTP API on a Unix-domain socket
(:mod:`worker.app`). Start it with :func:`worker.main.run_worker` or
``python -m worker``; the service (:mod:`service`) normally starts and supervises it.

Importing this package (or :mod:`worker.sources`, :mod:`worker.protocol`) does not import
MLX; the service relies on that. The job store it shares with the service is :mod:`jobstore`.
"""
