"""The ROS-free speculative decoding engine: model adapters, verification rules, the loop."""
