"""ZeroMQ messaging shared by the teacher and rollout services: codec, auth, broker, worker, client."""
