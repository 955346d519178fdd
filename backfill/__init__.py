"""backfill: Flurry's Data Download API into hive-partitioned Parquet, resumably."""

__version__ = "0.1.0"
