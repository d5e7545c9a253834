"""Go2 backends: the unitree_sdk2py adapters the nodes use, and the simulated Go2 that speaks the same DDS protocol."""
