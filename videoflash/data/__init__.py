"""The data room: frame sampling, decoding, conversations -> tokens, the WebDataset loader, collation.

Knows nothing of the model beyond the token counts it is told (``tokens_per_frame``,
``tokens_per_image``) and the anyres tiling geometry it imports from :mod:`videoflash.model.anyres`.

Entry points for the trainer (see docs/data.md)::

    from videoflash.data import LoaderConfig, DataSource, build_loader
    loader = build_loader(LoaderConfig(sources=[DataSource("shards/synth-{000000..000003}.tar")], ...),
                          tokenizer, rank=rank, world_size=world_size)
    for batch in loader: ...                   # dicts per docs/contracts.md section 1
    state = loader.state_dict(); loader.load_state_dict(state)
"""

from .collate import BATCH_KEYS, Sample, collate
from .conversation import ConversationTokenizer, normalize_conversation, place_placeholder, time_message
from .pipeline import DataSource, LoaderConfig, VideoLoader, build_loader, load_sources, resolve_sources
from .sampling import frame_count, frame_indices, middle_indices

__all__ = [
    "BATCH_KEYS",
    "ConversationTokenizer",
    "DataSource",
    "LoaderConfig",
    "Sample",
    "VideoLoader",
    "build_loader",
    "collate",
    "frame_count",
    "frame_indices",
    "load_sources",
    "middle_indices",
    "normalize_conversation",
    "place_placeholder",
    "resolve_sources",
    "time_message",
]
