"""The bulk data path of a shard (issue 21): rows, readouts and row gradients move between a
client and a shard at the speed of the link between them; gRPC keeps the requests.

    kind       where                  how the bytes move
    shm        same host, host memory  a memfd staging buffer both map: one copy in, one out
    cuda_ipc   same host, GPU          a staging buffer on the shard's GPU, mapped by CUDA IPC
    dist       any host                a 2-rank torch.distributed group (gloo, or NCCL on GPUs)
    (gRPC)     any host                the fallback: store_service.client

Modules, one job each: config (settings and limits), hostid, tickets (one-time), handoff (fds
over a unix socket against a ticket), shm / cuda_ipc / dist (the three media), sessions and
service (the shard's side), slots (a buffer cut in pieces kept in flight), ends and client
(the client's side), shard (a remote shard that takes the fast path when it can).
"""
from store_service.transport.paths import register as _register

_register()
