"""Where a job runs: the body of the trainer process that the local worker starts for each attempt of a job
(:mod:`.attempt`). It drives the training core (:mod:`phitune.trainer`) and records through the job's records; it
imports neither the local store nor any backend."""
