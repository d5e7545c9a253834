"""`speculative-vlm replay`: play a rosbag2 bag into the graph with /clock, like `ros2 bag play --clock`."""

from __future__ import annotations

import argparse
import time

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node

from speculative_vlm.bags.player import BagNotFound, BagPlayer


def _remap(text: str) -> tuple[str, str]:
    source, sep, target = text.partition(":=")
    if not sep or not source or not target:
        raise argparse.ArgumentTypeError(f"remap {text!r} must look like /from:=/to")
    return source, target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bag", help="bag folder (with metadata.yaml), MCAP or SQLite")
    parser.add_argument("-r", "--rate", type=float, default=1.0, help="playback speed factor (default 1.0)")
    parser.add_argument("-l", "--loop", action="store_true", help="start over at the end until Ctrl-C")
    parser.add_argument("--start-offset", type=float, default=0.0, help="skip this many seconds of the bag's start")
    parser.add_argument("--topics", nargs="+", help="play only these bag topics")
    parser.add_argument("--remap", type=_remap, action="append", default=[], metavar="FROM:=TO", help="publish a bag topic under another name")
    parser.add_argument("--namespace", default="", help="prefix every played topic (not /clock) with this namespace")
    parser.add_argument("--clock", type=float, default=40.0, metavar="HZ", help="/clock rate in Hz, 0 for none (default 40)")
    parser.add_argument("--wait-for-subscribers", type=float, default=0.0, metavar="S", help="wait up to S seconds for subscribers first")
    parser.add_argument("--ros-args", nargs=argparse.REMAINDER, default=[], help="ROS arguments for the player node")


def run(args: argparse.Namespace) -> int:
    rclpy.init(args=["speculative-vlm-replay", "--ros-args", *args.ros_args])
    node = Node("bag_player")
    try:
        player = BagPlayer(
            node, args.bag, rate=args.rate, loop=args.loop, start_offset_s=args.start_offset, topics=args.topics,
            remap=dict(args.remap), namespace=args.namespace, clock_hz=args.clock,
            wait_for_subscribers_s=args.wait_for_subscribers,
        )
    except (BagNotFound, ValueError) as exc:
        print(exc)
        node.destroy_node()
        rclpy.try_shutdown()
        return 1
    print(f"playing {args.bag}: {player.message_count} messages, {player.duration_s:.1f} s at rate {args.rate}"
          f"{' (looping)' if args.loop else ''} on {', '.join(player.topics)}")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    player.start()
    last_report = time.monotonic()
    try:
        while rclpy.ok() and not player.done:
            executor.spin_once(timeout_sec=0.1)
            if time.monotonic() - last_report >= 2.0:
                last_report = time.monotonic()
                position = (player.position_ns - player.start_ns) / 1e9
                print(f"{position:6.1f} / {player.duration_s:.1f} s  {player.report.total} messages published")
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        player.stop()
        player.wait(5.0)
        node.destroy_node()
        rclpy.try_shutdown()
    report = player.report
    print(f"published {report.total} messages in {report.wall_s:.1f} s ({report.loops} complete passes)")
    return 0
