"""Data layer: sources -> tokenizer -> tokenized corpus -> batches (see ARCHITECTURE.md)."""
from bipe_jax.data.pipeline import (PACKINGS, Corpus, eval_batches, make_batch,
                                    prepare, train_iterator, unigram_perplexity)
from bipe_jax.data.sources import (list_files, read_documents, split_documents,
                                   split_files, stdlib_files)
from bipe_jax.data.tokenizer import Tokenizer, load_or_train, train_tokenizer
