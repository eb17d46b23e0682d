"""Data: pretraining shards (download, built-in corpus), packed loader, chat collation."""
