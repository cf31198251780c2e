"""Data: sources -> tokenizer + token shards (prepare.py, once) -> batches (loader.py, every run).
sources.py and hub.py find documents, tokenizer.py is the BPE tokenizer, shards.py the on-disk format."""
