"""The cloud verifier service: hosts the target model for many robots (no ROS here)."""
