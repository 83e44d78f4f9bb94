"""The service layer the teacher and the rollout share: ZeroMQ messaging (``transport``: broker, workers,
clients, codec, auth, child processes), a service's brokers and supervised workers (``host``), the GPUs of
its workers and its vLLM knobs (``gpus``), vLLM's engine plumbing (``vllm``), checks of the values a
reply carries (``values``), waiting for a service to start (``startup``), and the checks of a command's
inputs (``inputs``). The services themselves are :mod:`gkd.teacher` and :mod:`gkd.rollout`, beside this
package. May import: ``gkd.config``, ``gkd.weights``, ``gkd.data``.
"""
