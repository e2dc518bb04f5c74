"""Adapters that bring recallk's losses to other training libraries (each needs its optional extra)."""
