"""`captionflow sink`: the caption and dead-letter topics into datasets, exactly once.

One module per job: ``schema`` (event models to Arrow columns), ``formats`` (Parquet,
JSONL), ``layout`` (dataset folders, Hive folders, file names), ``buffer`` (when a
partition rolls), ``writer`` (a roll's rows as files), ``stores`` with ``local_store`` and
``s3_store`` (atomic writes), ``readiness`` and ``metrics``, ``service`` (the consumer
loop, commits and lifecycle) and ``read`` (the dataset back as one table). docs/sink.md.
"""
