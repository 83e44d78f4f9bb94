"""Teacher engines (transformers, vLLM) and the teacher service.

- ``types``: ``TeacherOutput``, ``check_sequences`` (the engine contract).
- ``hf_engine.HFTeacherEngine`` / ``vllm_engine.VLLMTeacherEngine`` (vllm imported there only, lazily).
- ``wire``: the ``score`` op's request/reply layout and the worker handler around an engine.
- ``client.TeacherClient``: ``submit(sequences, top_k, temperature) -> Future[list[TeacherOutput]]``.
- ``service``: ``EngineSpec``, ``serve``/``join``/``ping`` (behind ``gkd teacher ...``).

May import: ``gkd.config``, ``gkd.data``, ``gkd.services``, and ``gkd.rollout``'s decoding (the hf
engine's answers reuse it).
"""

from gkd.teacher.types import TeacherOutput, check_sequences

__all__ = ["TeacherClient", "TeacherOutput", "check_sequences"]


def __getattr__(name: str):
    # The client (and with it ZeroMQ) loads on first use: code that needs only the types stays light.
    if name == "TeacherClient":
        from gkd.teacher.client import TeacherClient

        return TeacherClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
