"""teachercache: offline knowledge distillation for language models.

Run the teacher once over a corpus, store its sparse next-token distributions (and selected hidden
states) in compressed Arrow shards, and train any number of students from those shards alone.
See docs/FORMAT.md for the cache format and ../README.md for the commands.
"""

__version__ = "0.1.0"
