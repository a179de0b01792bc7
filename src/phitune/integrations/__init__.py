"""Experiment tracking where a job trains: MLflow runs and TensorBoard event files.

The options are typed in :mod:`phitune.types` (:class:`~phitune.types.MLflow`, :class:`~phitune.types.TensorBoard`,
``JobSpec.integrations``); :mod:`phitune.integrations.tracking` runs them inside the local trainer process. Importing
this package loads neither MLflow nor TensorBoard.
"""
