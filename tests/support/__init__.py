"""Shared test fixtures and helpers. Reuse these before starting anything of your own: each
engine or server start costs the suite 20-40 s on 2 cores, and the whole suite must stay
under 10 minutes (``scripts/test.sh`` prints the 15 slowest tests).

Session fixtures (one per test process: scripts/test.sh runs two, and keeps a module's tests
in one of them, scheduling.py; registered in tests/conftest.py). A module that must share a
test process with another (one ``vllm serve``, fixed ports) is listed in
``scheduling.SHARED_GROUPS``:

- ``broker`` (broker_fixtures.py): the embedded Tansu broker; per test, ``kafka`` (its
  settings), ``topics`` (three fresh 4-partition topics) and ``group_id`` (a fresh group).
- ``vllm_backend`` (model_fixtures.py): THE in-process vLLM CPU engine for the tiny model
  (greedy, ``max_tokens`` 12); mark tests ``@pytest.mark.asyncio(loop_scope="session")``.
  ``tiny_settings`` are its settings; ``hf_backend_sync`` a transformers reference.
- ``vllm_server`` (vllm_server.py): THE ``vllm serve`` for the tiny model (openai backend),
  restarted if a test before killed it; ``kill()``/``restart()`` for outage tests.
- ``s3_server`` / ``s3_bucket`` (s3_fixtures.py): moto_server on loopback, a fresh bucket.
- ``caption_videos`` (worker_fixtures.py): 12 small distinct real videos;
  ``running_worker`` runs a Worker on the shared engine, ``worker_settings`` gives fast
  group timeouts; ``live_worker`` (module scope) a worker under traffic.
- ``video_corpus`` (video_fixtures.py): the PyAV corpus of good and hostile files;
  ``http_server`` a loopback HTTP server with per-path routes.

Start your own engine, server or broker only when the test kills or reconfigures it, and
then say why in the test. Keep videos short, ``max_tokens`` tiny and event counts small
unless the test is about volume.
"""
