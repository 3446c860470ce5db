"""The network (flat and self-contained: copied verbatim into exported HF checkpoints)."""
