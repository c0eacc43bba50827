"""Where tokens come from: the embedded corpus, text corpora, pre-tokenized shards, samplers and tokenizers."""
