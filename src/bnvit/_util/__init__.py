"""Private helpers shared by every layer: atomic writes and locks (`io`), argument checks, devices and precision."""
