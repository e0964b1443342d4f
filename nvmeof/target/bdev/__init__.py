"""Backing devices ("bdevs", in SPDK's word) that namespaces are made from."""
