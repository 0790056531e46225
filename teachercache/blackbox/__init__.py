"""Black-box distillation data: teacher-written answers (``generate``), their prompt ``templates``, and
distilling step-by-step records (``stepbystep``). Nothing here touches a cache: its output is chat JSON
Lines that ``teachercache build`` reads.
"""
