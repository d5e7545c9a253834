"""The robot <-> cloud verification protocol: the .proto, its generated stubs, message
conversion to the engine's dataclasses, and the gRPC client the robot's bridge uses."""
