"""alignflow: community votes to aligned language models.

The installed package maps the repository's top-level folders to subpackages:
``alignflow.flows`` (orchestration and CLI), ``alignflow.tasks`` (the work of
each stage), ``alignflow.models`` (networks and tokenizers) and
``alignflow.data_contracts`` (Great Expectations suites).
"""

__version__ = "0.1.0"
