"""teachercache: offline knowledge distillation for language models.

Run the teacher once over a corpus, store its sparse next-token distributions (and selected hidden
states) in compressed Arrow shards, and train any number of students from those shards alone.

Subpackages, lowest layer first (tests/test_layering.py holds every module to it):
``format`` (the on-disk contract; no torch), ``teacher`` (the teacher pass), ``inspect`` (reading a
cache for people), ``interop`` (other tools' files in and out), ``blackbox`` (teacher-written data, no
cache); ``errors``, ``numerics`` and ``runtime`` serve them all; ``cli`` sits on top. The student
package (training from a cache) sits between these and the CLI.
"""

__version__ = "0.3.0"

from teachercache import compat as _compat

_compat.install()
