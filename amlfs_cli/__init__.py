"""The ``amlfs`` command: the operator's terminal over the flows (``flows/``) and the
Prefect-free core (``amlfs/``). It sits above both, so the core imports neither the CLI nor
Prefect (``python -m amlfs_cli``, or the ``amlfs`` script)."""
