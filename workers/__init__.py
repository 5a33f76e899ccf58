"""grokserve.workers: expert-parallel workers serving their shard of experts over gRPC."""
