"""Inference side of videoflash: HF hub export (``export``, ``model_card``, ``hub``), the chat CLI
(``chat_cli``). The model-side helpers (``chat``, long-video encoding, YaRN, inference dropout) live
in ``videoflash/model/inference_videoflash.py`` because exported checkpoints carry them."""
