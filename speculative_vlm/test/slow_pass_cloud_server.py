"""``speculative-vlm-cloud`` for the drain and restart tests: the real ``main()`` (flags, signals,
drain), on a target whose verification passes each take a set time, as a big model's would, so a
test can send SIGTERM while a block is in flight. Prefills (passes of more than 16 tokens) are
not slowed, so sessions still open at once. Usage: ``slow_pass_cloud_server.py SECONDS_PER_PASS
[speculative-vlm-cloud flags]``.
"""

import sys
import time

from speculative_vlm.cloud import server

PREFILL_TOKENS = 16  # a pass that feeds more tokens than this is a prefill


def main() -> int:
    seconds_per_pass = float(sys.argv[1])
    build = server.build_engine

    def build_slowed(config):
        engine = build(config)

        def pause(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] <= PREFILL_TOKENS:
                time.sleep(seconds_per_pass)  # releases the GIL, as a forward pass does

        engine.model.decoder_layers[0].register_forward_pre_hook(pause, with_kwargs=True)
        return engine

    server.build_engine = build_slowed
    return server.main(sys.argv[2:])


if __name__ == "__main__":
    raise SystemExit(main())
