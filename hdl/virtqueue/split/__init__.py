"""The split-ring front end (virtio 1.2 2.7): avail ring, descriptor chains, used ring, and
the engine that joins them to the shared blocks."""
