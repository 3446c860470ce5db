"""Offline tools: shards from annotations and media, the synthetic corpus (``python -m data_tools.<tool>``)."""
