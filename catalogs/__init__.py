"""Spectrum catalogs: the Arrow schema, Parquet shard I/O, importers and the synthetic survey generator."""
