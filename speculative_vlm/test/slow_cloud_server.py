"""``speculative-vlm-cloud`` for the resource tests: the real ``main()`` (configuration, signals,
shutdown), on a target slowed to a given number of seconds per token fed, as a big model on a
busy machine would be. Usage: ``slow_cloud_server.py SECONDS_PER_TOKEN [speculative-vlm-cloud flags]``.
"""

import sys

from speculative_vlm.cloud import server
from tiny_models import slow_down


def main() -> int:
    seconds_per_token = float(sys.argv[1])
    build = server.build_engine

    def build_slowed(config):
        engine = build(config)
        slow_down(engine.model, seconds_per_token)
        return engine

    server.build_engine = build_slowed
    return server.main(sys.argv[2:])


if __name__ == "__main__":
    raise SystemExit(main())
