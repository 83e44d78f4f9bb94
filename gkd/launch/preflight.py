"""The launcher's checks before it starts any child: those of a trainer process (:func:`check_run`), plus
the ports the services and trainer rank 0 bind on this node, and a launched teacher's tokenizer. The
checks of single inputs (and :class:`InputError`) are :mod:`gkd.services.inputs`.

    check_launch(cfg, r)   # gkd train on node r: check_run + the ports its services (and trainer rank 0) bind
"""

from __future__ import annotations

from gkd.config import Config
from gkd.services.inputs import InputError, _distinct, _first_line, check_run, model_folder, port_free

__all__ = ["check_bind_ports", "check_launch", "check_tokenizers"]

# ----------------------------------------------------------------------------------------- gkd train


def check_bind_ports(
    cfg: Config, node_rank: int = 0, host: str = "127.0.0.1", *, torch_port: int | None = None
) -> None:
    """The ports ``gkd train`` binds on node ``node_rank`` at ``host``: the client and worker ports of the
    services launched there and, on node 0, the weight channel's store (trainer rank 0) and
    (``torch_port``) torchrun's store: distinct and free."""
    ports = []
    if node_rank == 0:
        ports += [("rollout.weight_port", cfg.rollout.weight_port)]
        ports += [("--rdzv-endpoint port + 1", torch_port)] if torch_port is not None else []
    for name in ("teacher", "rollout"):
        section = getattr(cfg, name)
        if section.launch and section.node_rank == node_rank:
            ports += [
                (f"{name}.server_port", section.server_port),
                (f"{name}.backend_port", section.backend_port),
            ]
    _distinct(ports)
    for key, port in ports:
        port_free(host, port, key)


def check_tokenizers(cfg: Config) -> None:
    """A launched teacher has the student's tokenizer (vocabulary and special tokens; reads the tokenizer
    files only). Different embedding padding (``config.vocab_size``) is fine (gkd.data.vocab); a teacher
    folder without tokenizer files is left to the trainer's check of the teacher service's fingerprint."""
    from gkd.data.vocab import check_same_tokenizer, has_tokenizer

    if not cfg.teacher.launch or not has_tokenizer(cfg.teacher.model_path):
        return
    try:
        check_same_tokenizer(
            cfg.model.student_path, cfg.teacher.model_path, "model.student_path", "teacher.model_path"
        )
    except (OSError, ValueError) as e:
        raise InputError(_first_line(e)) from e


def check_launch(
    cfg: Config, node_rank: int = 0, host: str = "127.0.0.1", *, torch_port: int | None = None
) -> None:
    """Everything ``gkd train`` checks on node ``node_rank`` before it starts a child: the teacher's model
    folder when it starts there, :func:`check_run` (the prompt files on node 0 only: trainer rank 0 reads
    them), :func:`check_tokenizers` where the teacher starts, :func:`check_bind_ports` at ``host``."""
    if cfg.teacher.launch and cfg.teacher.node_rank == node_rank:
        model_folder(cfg.teacher.model_path, "teacher.model_path")
    check_run(cfg, data=node_rank == 0)
    if cfg.teacher.node_rank == node_rank:
        check_tokenizers(cfg)
    check_bind_ports(cfg, node_rank, host, torch_port=torch_port)
