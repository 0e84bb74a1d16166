"""The virtqueue engine: the blocks every ring format shares (DMA read and write ports,
data fetch, realignment, parked heads) and, per ring format, the front end that reads the
driver's ring and writes the device's (``split``: virtio 1.2 2.7)."""
