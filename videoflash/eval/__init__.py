"""Evaluation. ``synthetic``: answer accuracy on the synthetic corpus's held-out questions."""
