"""The ROS-free speculative decoding engine: model adapters, verification rules, the loop.

Modules, one job each:

- ``verifier``: the contract between the loop and any verifier (requests, blocks, verdicts, errors)
- ``admission``: every field of a request and a block checked before any work (fail closed)
- ``models``: Hugging Face adapters (causal LM, Idefics3-style VLM), KV cache per sequence,
  rollback by cropping, batched forward with layer hooks; ``load_model(name_or_path, dtype, device)``
- ``placement``: the ``device`` and ``dtype`` settings, parsed and checked on this machine
- ``exits``: early-exit heads (shared norm + LM head, or trained adapters from a checkpoint)
- ``rules``: temperature/top-k/top-p warping, greedy and rejection-sampling verification
- ``grammar``: xgrammar matcher per sequence (masks, rollback, forced tokens)
- ``sequence``: output rules both sides share (EOS, budget, grammar end, forced tokens)
- ``target_engine``: ``TargetEngine`` (sessions, batched verify with early verdicts, generate)
- ``drafter``: the draft side of one session
- ``sessions``: the verifier's ``SessionStore`` of ``ServedSession``s (target, queued blocks, outbox of events)
- ``scheduler``: ``BatchScheduler``, the one loop that batches sessions' blocks into target passes
- ``inprocess``: ``InProcessVerifier`` (a ``Verifier`` over the store and the scheduler, no wire; also streams)
- ``loop``: ``SpeculativeDecoder`` (the session's method, preemption, pipelining, cloud AR streaming,
  telemetry, draft-only fallback)
- ``policy``: fixed and adaptive draft lengths; ``MethodChooser``: per session, speculation (with the
  draft length the round trip calls for) or the verifier streaming the target's tokens
- ``model_store``: where models live, the one-time SmolLM2 conversion
"""
