"""A torch.distributed (gloo) echo peer for bench/dispatch.py: the cross-host candidate measured beside gRPC.

Rank r of `world`: for each round it receives a header (request bytes, reply bytes, iterations) from rank 0,
then answers each request payload with a reply of the given size, as an expert worker would. A header with
iterations = 0 ends it.

    python bench/gloo_peer.py RANK WORLD PORT
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def main(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    print("gloo peer SERVING on rank", rank, flush=True)
    header = torch.zeros(3, dtype=torch.int64)
    while True:
        dist.recv(header, src=0)
        request_bytes, reply_bytes, iterations = header.tolist()
        if iterations == 0:
            break
        request = torch.empty(request_bytes, dtype=torch.uint8)
        reply = torch.zeros(reply_bytes, dtype=torch.uint8)
        for _ in range(iterations):
            dist.recv(request, src=0)
            dist.send(reply, dst=0)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
