"""Prefix caching: the content keys of a sequence's full KV blocks, and the stats of lookups.

Block i of a sequence holds tokens [i·B, (i+1)·B) (B = block size). Its key chains a digest over the model
(its architecture id and the KV dtype: `root_digest`), the previous block's digest and the block's token ids,
so equal keys mean equal prefixes up to and including the block. Only full blocks get keys: a partly filled
last block is never shared (a request that extends it writes into its own copy, computed anew). The
scheduler (router/scheduler.py) maps a new request's leading blocks onto cached ones with these keys and
registers blocks as they fill; the allocator (router/kv_blocks.py) checks whole keys, not digests alone.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

from grokserve.router.kv_blocks import BlockKey
from grokserve.router.sequence import Sequence

DIGEST_BYTES = 16


def root_digest(model_id: str, kv_dtype: str) -> bytes:
    """The digest every chain starts from: blocks of another model or KV dtype can never match."""
    return hashlib.blake2b(f"{model_id}|{kv_dtype}".encode(), digest_size=DIGEST_BYTES).digest()


def block_key(parent: bytes, tokens: list[int]) -> BlockKey:
    digest = hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=DIGEST_BYTES).digest()
    return BlockKey(digest, parent, tuple(tokens))


def block_keys(seq: Sequence, count: int, block_size: int, root: bytes) -> list[BlockKey]:
    """The keys of `seq`'s first `count` full blocks (its tokens must fill them), computed once per sequence:
    tokens are only ever appended, so earlier keys stay valid."""
    keys: list[BlockKey] = seq.block_keys
    ids = seq.all_ids if len(keys) < count else ()
    while len(keys) < count:
        i = len(keys)
        keys.append(block_key(keys[-1].digest if keys else root, list(ids[i * block_size:(i + 1) * block_size])))
    return keys[:count]


@dataclass
class PrefixCacheStats:
    """Token counts since start: looked up (prompt tokens of admitted sequences) and found cached."""

    queries: int = 0
    hits: int = 0
