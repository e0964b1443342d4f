"""The NVMe/RDMA transport binding, sans-IO: capsule layouts, keyed SGLs and RDMA-CM private data.

The verbs calls live in ``nvmeof.transport.rdma``; nothing here touches a device or an event loop.
"""
