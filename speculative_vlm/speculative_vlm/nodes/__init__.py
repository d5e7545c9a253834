"""Thin rclpy nodes: camera, drafter, bridge, motion, monitor. Each is a Node subclass plus a main()."""
