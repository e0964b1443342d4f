"""GPUCache as LMCache's remote KV store, with no patch to LMCache (docs/lmcache.md).

- ``kvext.lmcache.connector``: in-process mode, a ``RemoteConnector`` and its
  ``ConnectorAdapter`` (imports ``lmcache``: load it only where LMCache is installed);
- ``kvext.lmcache.native``: multiprocess mode, a ``native_plugin`` L2 connector (no ``lmcache``
  import needed);
- ``kvext.lmcache.store``: the shared core (chunk reads into caller buffers, pipelined prefix
  existence, KV-aware prefetch); ``kvext.lmcache.url``: the ``nvmeof://`` URL.

Importing this package imports neither ``lmcache`` nor ``torch``.
"""
