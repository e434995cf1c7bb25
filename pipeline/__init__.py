"""DVC + MLflow pipeline around the ``cnn`` engine.

Each stage in ``dvc.yaml`` is a thin command-line module in this package
(``python -m pipeline.<stage>``). Every knob lives in ``params.yaml`` and is
validated by :mod:`pipeline.params` before a stage does any work.
:mod:`pipeline.forget` is no stage: it tidies up after a run is deleted from params.yaml.
"""
