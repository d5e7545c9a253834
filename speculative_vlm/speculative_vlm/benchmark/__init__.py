"""The benchmark suite (``speculative-vlm bench``): every decoding method side by side on the same
prompts and scene frames, robot and cloud as separate pinned processes joined through the delay
proxy, the ROS hop, a fleet against one verifier, and a report against the targets in ANCHORS.

Results are written to ``speculative_vlm/bench/results/`` (CSV, ``report.md``, PNG plots).
"""
