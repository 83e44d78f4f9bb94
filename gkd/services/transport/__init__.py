"""ZeroMQ messaging shared by the teacher and rollout services.

Pieces (each module's docstring has the details):
- ``codec``    -- ``encode(op, id, fields, tensors) -> frames``; ``decode(frames, ops=..., limits=...) ->
  Message`` (``.op``, ``.id``, ``.fields``, ``.tensors``); ``Limits``; ``ProtocolError``. msgpack header
  + one raw frame per tensor; zero-copy both ways; never pickle.
- ``broker``   -- ``Broker(ops, host=..., frontend_port=15555, backend_port=15556, auth=...)``:
  load-balancing by readiness, heartbeats, re-queue on worker death, bounded queue, ``info``/``ping``.
  ``.run(stop_event)`` in a process, or ``.start()``/``.stop()`` in a background thread.
- ``worker``   -- ``Worker(backend_address, handler, ops=..., info=...)`` with
  ``handler(header, tensors) -> (fields, tensors)``; one request at a time, heartbeats while busy;
  ``available=`` and ``HandBack`` step it away from the broker for a while.
- ``client``   -- ``Client(frontend_address, timeout_s=..., retries=..., auth=...)``:
  ``submit(op, fields, tensors) -> Future[Message]``, ``call``, ``info``, ``submit_split``;
  ``plan_chunks`` for order-preserving micro-batching; ``RemoteError`` (``.code``) for error replies;
  ``ServiceUnavailable`` when the broker stops answering its liveness pings (``liveness_timeout_s``).
- ``auth``     -- ``Auth(secret)`` / ``Auth.from_file(path)``: HMAC-SHA256 over every frame, with a
  timestamp + nonce against replay. Pass the same object kind to broker, workers and clients.

A service built on this (teacher, rollout) defines its ops and field/tensor names, a handler around its
engine, and a thin typed client that packs requests and unpacks ``Message`` replies.
"""

from gkd._lazy import lazy_names

# Names resolve on first use (PEP 562): importing gkd.services.transport.process or .auth does not import
# torch (the codec's tensors), so `gkd train`'s launcher starts its children without paying for it.
__getattr__, __all__ = lazy_names(
    __name__,
    {
        "auth": ("Auth", "AuthError"),
        "broker": ("Broker",),
        "client": ("Client", "ClientClosed", "RemoteError", "ServiceUnavailable", "plan_chunks"),
        "codec": (
            "PROTOCOL_VERSION",
            "Limits",
            "Message",
            "ProtocolError",
            "decode",
            "encode",
            "error_frames",
            "reply_frames",
        ),
        "protocol": ("DEFAULT_BACKEND_PORT", "DEFAULT_FRONTEND_PORT", "tcp_address"),
        "worker": ("HandBack", "Worker"),
    },
)
