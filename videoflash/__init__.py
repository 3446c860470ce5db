"""videoflash: train long-video language models (VideoChat-Flash style)."""
