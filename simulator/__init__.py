"""Software simulator of the fabric (see the simulator issue)."""
