"""The cache on disk, defined once: schema, row batches, the target codec (codec, with bits, quantizer and
references), records, shards, manifest, Cache.

This is the contract every other part reads and writes through (docs/FORMAT.md describes every byte).
It imports no torch and nothing else of teachercache but ``errors``: a cache is data, and reading one
needs only pyarrow, numpy and numba.
"""
