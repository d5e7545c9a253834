"""speculative_vlm: speculative edge-cloud decoding with early exits for a Unitree Go2."""

__version__ = "0.1.0"
