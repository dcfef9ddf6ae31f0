"""Data: embedded corpora, tokenizers, tokenised memory-mapped splits, deterministic batches.

    prepared = prepare_dataset("shakespeare")          # cached under ~/.cache/deltalearn/data
    sampler = BatchSampler(prepared.tokens("train"), seq_len=256, global_batch_size=64, seed=0)
    x, y = sampler.batch(step)                        # int64 (64, 256); y is x shifted by one
    for x, y in eval_batches(prepared.tokens("val"), 256, 64): ...

Modules: `corpora` (sources → documents), `split` (the train/val rule), `tokenizer` (BPE / GPT-2),
`prepare` (the on-disk cache), `sampler` (training and evaluation batches).
"""

from deltalearn.data.corpora import BUILTIN_SOURCES, markdown_to_dialogue, resolve_source
from deltalearn.data.prepare import PreparedData, default_cache_dir, prepare_dataset
from deltalearn.data.sampler import BatchSampler, eval_batches, shard_rows
from deltalearn.data.split import split_documents
from deltalearn.data.tokenizer import EOS_TOKEN, TOKENIZER_KINDS
from deltalearn.errors import DataError

__all__ = [
    "BUILTIN_SOURCES",
    "EOS_TOKEN",
    "TOKENIZER_KINDS",
    "BatchSampler",
    "DataError",
    "PreparedData",
    "default_cache_dir",
    "eval_batches",
    "markdown_to_dialogue",
    "prepare_dataset",
    "resolve_source",
    "shard_rows",
    "split_documents",
]
