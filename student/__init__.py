"""student: train small models from a teachercache cache, with the teacher nowhere in memory.

(The trainer, data loader and losses arrive with the trainer issue; the package exists from the start so
the project layout is stable.)
"""
