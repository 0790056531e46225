"""Reading a cache for people: rows with their text, reports, verification, plots, diffs.

``rows`` (a cache's rows as CacheRow), ``report`` (``teachercache inspect``), ``verify``, ``show``,
``plot``, ``diff``. The names of the former module ``teachercache.inspect`` (now ``report``) are
re-exported here for one release.
"""

from teachercache.inspect.report import (CAPTURED_EDGES, ENTROPY_EDGES, QUANTILES, Histogram, IntCounts,
                                         column_bytes_estimate, format_report, inspect_cache)

__all__ = ["CAPTURED_EDGES", "ENTROPY_EDGES", "QUANTILES", "Histogram", "IntCounts", "column_bytes_estimate",
           "format_report", "inspect_cache"]
