"""The block pool's prefix cache: reference counts, LRU eviction of unreferenced cached blocks, whole-key checks,
and the scheduler mapping a prompt onto cached blocks."""

from __future__ import annotations

from grokserve.model.sampling import SamplingParams, make_generator
from grokserve.router.kv_blocks import BlockAllocator, BlockKey
from grokserve.router.prefix_cache import block_key, block_keys, root_digest
from grokserve.router.scheduler import Scheduler
from grokserve.router.sequence import Sequence

ROOT = root_digest("test-model", "float32")


def seq_of(ids: list[int], **params) -> Sequence:
    return Sequence(request_id="r", prompt_ids=ids, params=SamplingParams(**params), generator=make_generator(0),
                    text_stream=None, sink=lambda out: None)  # type: ignore[arg-type]


def test_released_registered_blocks_stay_cached_until_an_allocation_needs_them():
    pool = BlockAllocator(num_blocks=5, block_size=4)  # 4 usable blocks
    a = pool.allocate(2)
    keys = [block_key(ROOT, [1, 2, 3, 4]), None]
    keys[1] = block_key(keys[0].digest, [5, 6, 7, 8])
    pool.register(a[0], keys[0])
    pool.register(a[1], keys[1])
    pool.release(a)
    assert pool.referenced == 0 and pool.cached_unreferenced == 2 and pool.free == 4
    assert pool.lookup(keys[0]) == a[0] and pool.lookup(keys[1]) == a[1]
    pool.share(a[0])  # a new sequence takes the first block
    assert pool.referenced == 1 and pool.cached_unreferenced == 1
    b = pool.allocate(3)  # 2 never-used blocks, then the cached, unreferenced a[1] is evicted
    assert b is not None and a[1] in b and a[0] not in b
    assert pool.lookup(keys[1]) is None and pool.lookup(keys[0]) == a[0]
    assert pool.allocate(1) is None  # a[0] is referenced: never evicted
    pool.release(b)
    pool.release([a[0]])
    assert pool.referenced == 0 and pool.free == 4


def test_eviction_is_least_recently_released_first_and_a_sequence_tail_goes_first():
    pool = BlockAllocator(num_blocks=5, block_size=2)
    blocks = pool.allocate(4)
    parent = ROOT
    keys = []
    for i, block in enumerate(blocks):
        keys.append(block_key(parent, [i, i]))
        parent = keys[-1].digest
        pool.register(block, keys[-1])
    pool.release(blocks[:2])  # released first: a sequence [b0, b1]
    pool.release(blocks[2:])  # then another [b2, b3]
    evicted = [pool.allocate(1)[0] for _ in range(4)]  # type: ignore[index]
    assert evicted == [blocks[1], blocks[0], blocks[3], blocks[2]]


def test_a_digest_collision_is_a_miss_not_a_wrong_block():
    pool = BlockAllocator(num_blocks=3, block_size=2)
    block = pool.allocate(1)[0]  # type: ignore[index]
    real = block_key(ROOT, [7, 8])
    pool.register(block, real)
    forged = BlockKey(real.digest, real.parent, (7, 9))  # same digest, other tokens
    assert pool.lookup(forged) is None and pool.lookup(real) == block
    assert pool.lookup(BlockKey(real.digest, b"x" * 16, real.tokens)) is None  # another prefix


def test_keys_chain_over_the_prefix_and_the_model():
    first = block_keys(seq_of([1, 2, 3, 4, 5, 6, 7, 8]), 2, 4, ROOT)
    other_start = block_keys(seq_of([9, 2, 3, 4, 5, 6, 7, 8]), 2, 4, ROOT)
    assert first[1].tokens == other_start[1].tokens and first[1].digest != other_start[1].digest
    other_model = block_keys(seq_of([1, 2, 3, 4]), 1, 4, root_digest("another-model", "float32"))
    assert other_model[0].digest != first[0].digest


def test_the_scheduler_maps_cached_blocks_and_prefills_the_rest():
    pool = BlockAllocator(num_blocks=20, block_size=4)
    cleared: list[list[int]] = []
    scheduler = Scheduler(pool, max_queue=8, max_running=8, token_budget=64, on_allocate=cleared.append,
                          prefix_root=ROOT)
    first = seq_of(list(range(10, 20)))  # 10 tokens: 2 full blocks + 2
    scheduler.add(first)
    out = scheduler.schedule()
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(0, 10)]
    first.num_computed_tokens = 10
    scheduler.register_computed(first)
    first.output_ids.append(5)  # the step sampled a token
    second = seq_of([*range(10, 18), 99, 98, 97])  # shares the 2 full blocks
    scheduler.add(second)
    out = scheduler.schedule()
    chunk = next(c for c in out.chunks if c.seq is second)
    assert (chunk.start, chunk.num_tokens) == (8, 3) and second.blocks[:2] == first.blocks[:2]
    assert scheduler.prefix_stats.queries == 21 and scheduler.prefix_stats.hits == 8
    wiped = {b for blocks in cleared[1:] for b in blocks}
    assert not wiped & set(first.blocks[:2])  # shared blocks are not wiped
    for seq in (first, second):
        scheduler.remove(seq)
    assert pool.referenced == 0 and pool.cached_unreferenced == 2


def test_a_request_arriving_while_its_prefix_is_computed_waits_a_step_then_hits():
    pool = BlockAllocator(num_blocks=20, block_size=4)
    scheduler = Scheduler(pool, max_queue=8, max_running=8, token_budget=64, prefix_root=ROOT)
    a, b = seq_of([*range(12), 50]), seq_of([*range(12), 60])
    scheduler.add(a, b)
    out = scheduler.schedule()
    assert [c.seq for c in out.chunks] == [a] and list(scheduler.waiting) == [b]
    a.num_computed_tokens = 13
    scheduler.register_computed(a)
    a.output_ids.append(5)
    out = scheduler.schedule()
    chunk = next(c for c in out.chunks if c.seq is b)
    assert (chunk.start, chunk.num_tokens) == (12, 1)


def test_prompt_logprobs_requests_and_a_disabled_cache_compute_everything():
    pool = BlockAllocator(num_blocks=20, block_size=4)
    scheduler = Scheduler(pool, max_queue=8, max_running=8, token_budget=64, prefix_root=ROOT)
    a = seq_of(list(range(9)))
    scheduler.add(a)
    scheduler.schedule()
    a.num_computed_tokens = 9
    scheduler.register_computed(a)
    a.output_ids.append(5)
    b = seq_of(list(range(9)), prompt_logprobs=0)
    scheduler.add(b)
    assert next(c for c in scheduler.schedule().chunks if c.seq is b).start == 0
    off = Scheduler(BlockAllocator(20, 4), 8, 8, 64, prefix_root=None)
    c = seq_of(list(range(9)))
    off.add(c)
    off.schedule()
    c.num_computed_tokens = 9
    off.register_computed(c)
    assert off.allocator.lookup(block_keys(seq_of(list(range(9))), 1, 4, ROOT)[0]) is None


def test_a_prefill_in_the_same_step_reads_the_blocks_another_prefill_computes():
    pool = BlockAllocator(num_blocks=20, block_size=4)
    scheduler = Scheduler(pool, max_queue=8, max_running=8, token_budget=64, prefix_root=ROOT)
    a, b = seq_of([*range(12), 50, 51]), seq_of([*range(12), 60, 61, 62])
    scheduler.add(a, b)
    out = scheduler.schedule()
    chunks = {id(c.seq): (c.start, c.num_tokens) for c in out.chunks}
    assert chunks == {id(a): (0, 14), id(b): (12, 3)} and b.blocks[:3] == a.blocks[:3]
    assert scheduler.prefix_stats.hits == 12
    # with micro-batch overlap the two may land in different forward calls: b waits a step instead
    apart = Scheduler(BlockAllocator(20, 4), 8, 8, 64, prefix_root=ROOT, share_in_step=False)
    c, d = seq_of([*range(12), 50, 51]), seq_of([*range(12), 60, 61, 62])
    apart.add(c, d)
    assert [ch.seq for ch in apart.schedule().chunks] == [c]
