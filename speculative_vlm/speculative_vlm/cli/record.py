"""`speculative-vlm record`: record topics into a rosbag2 MCAP bag until Ctrl-C or a duration."""

from __future__ import annotations

import argparse
import time
from datetime import datetime

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter

from speculative_vlm.bags.recorder import BagExists, BagRecorder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topics", nargs="*", help="topics to record (default: every visible topic)")
    parser.add_argument("-o", "--output", help="bag folder to create (default: rosbag2_<date>-<time>)")
    parser.add_argument("-a", "--all", action="store_true", help="record every visible topic (the default with no topics)")
    parser.add_argument("--include-hidden", action="store_true", help="with --all, also record hidden topics (/_...)")
    parser.add_argument("-d", "--duration", type=float, default=0.0, help="stop after this many seconds (0: until Ctrl-C)")
    parser.add_argument("--use-sim-time", action="store_true", help="stamp messages with /clock time instead of wall time")
    parser.add_argument("--ros-args", nargs=argparse.REMAINDER, default=[], help="ROS arguments for the recorder node")


def run(args: argparse.Namespace) -> int:
    if args.all and args.topics:
        print("give either topics or --all, not both")
        return 2
    output = args.output or datetime.now().strftime("rosbag2_%Y_%m_%d-%H_%M_%S")
    rclpy.init(args=["speculative-vlm-record", "--ros-args", *args.ros_args])
    node = Node("bag_recorder", parameter_overrides=[Parameter("use_sim_time", value=args.use_sim_time)])
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        recorder = BagRecorder(node, output, args.topics or None, include_hidden=args.include_hidden)
    except BagExists as exc:
        print(exc)
        node.destroy_node()
        rclpy.try_shutdown()
        return 1
    print(f"recording to {output} ({'all topics' if not args.topics else ', '.join(args.topics)}); Ctrl-C stops")
    began = last_report = time.monotonic()
    try:
        while rclpy.ok() and (args.duration <= 0 or time.monotonic() - began < args.duration):
            executor.spin_once(timeout_sec=0.1)
            if time.monotonic() - last_report >= 2.0:
                last_report = time.monotonic()
                counts = recorder.counts
                print(f"{time.monotonic() - began:6.1f} s  {sum(counts.values())} messages  " +
                      "  ".join(f"{t}: {n}" for t, n in sorted(counts.items())))
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        counts = recorder.counts
        recorder.close()
        node.destroy_node()
        rclpy.try_shutdown()
    print(f"wrote {sum(counts.values())} messages on {len(counts)} topics to {output}")
    for topic, reason in recorder.refused.items():
        print(f"not recorded: {topic}: {reason}")
    return 0
