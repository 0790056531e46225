"""The teacher pass: corpus in, cache out.

``corpus`` reads documents and packs them into rows with their loss masks, ``targets`` turns the
teacher's logits into sparse targets on the device, ``build`` runs the forward passes beside a writer
thread (resume, torchrun).
"""
