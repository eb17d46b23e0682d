"""Data: pretraining shards (download, built-in corpus), packed loader, chat batches.

`from picochat.data import sft_collate` works; torch-dependent modules load on first use,
so light users (the registry, the corpus builder, the tasks) stay fast to import.
"""

__all__ = ["PackedConversations", "PaddedConversations", "sft_collate"]  # loaded on first use


def __getattr__(name: str):
    if name in __all__:
        from picochat.data import chat_batches  # on first use: the batchers pull in torch, the shards do not

        return getattr(chat_batches, name)
    raise AttributeError(f"module 'picochat.data' has no attribute {name!r}")

