"""The trainer's start-up check of the services it talks to (reachable, the student's vocabulary and
tokenizer, the limits that cross services); re-exported by ``gkd.trainer.recipe``."""

from __future__ import annotations

import logging

from gkd.config import Config
from gkd.config.limits import service_limits
from gkd.services.startup import service_info
from gkd.trainer.setup import StartupError, _auth_hint
from gkd.trainer.step import unwrap

log = logging.getLogger("gkd.trainer")

STARTUP_TIMEOUT_S = 10.0  # a broker answers info itself (no worker involved): slow means unreachable


# ------------------------------------------------------------------------------------------ start-up checks


def _worker_infos(client, name: str, section, expected: int, serve_command: str) -> list[dict]:
    """The ``info`` of each worker of the ``name`` service (waiting for ``expected`` workers of a service
    this run launched); an unreachable service is a StartupError saying how to start it."""
    try:
        info = service_info(client, expected, section.launch, STARTUP_TIMEOUT_S)
    except Exception as e:
        raise StartupError(
            f"{name} service at {section.server_ip}:{section.server_port} is not reachable "
            f"({type(e).__name__}: {e}); start it with {serve_command} or set {name}.launch=true"
            + _auth_hint(name, section.auth_secret_file)
        ) from e
    return [w.get("info", {}) for w in info.get("workers", [])]


def check_services(cfg: Config, teacher, rollout, model, n_rollout: int, tokenizer=None) -> None:
    """Teacher reachable and on the student's vocabulary; rollout reachable with its workers. Services
    that ``gkd train`` started with the trainer (``*.launch``) are waited for until their workers are up."""
    from gkd.teacher.service import tokenizer_fingerprint

    vocab = int(unwrap(model).config.vocab_size)
    t_addr = f"{cfg.teacher.server_ip}:{cfg.teacher.server_port}"
    workers = _worker_infos(teacher, "teacher", cfg.teacher, cfg.teacher.workers, "`gkd teacher serve`")
    if not workers:
        raise StartupError(f"teacher service at {t_addr} has no workers; start some with `gkd teacher join`")
    mine = tokenizer_fingerprint(cfg.model.student_path, tokenizer=tokenizer)
    for w in workers:
        if int(w.get("token_ids", w.get("vocab_size", -1))) > vocab:  # embedding padding may differ
            raise StartupError(
                f"teacher {w.get('model')} serves ids below {w.get('token_ids', w.get('vocab_size'))}, the "
                f"student {cfg.model.student_path} has {vocab} rows: distillation needs one shared vocabulary"
            )
        theirs = str(w.get("tokenizer", "none"))
        if mine.startswith("sha256:") and theirs.startswith("sha256:") and theirs != mine:
            raise StartupError(
                f"teacher {w.get('model')} tokenizer {theirs} differs from the student's {mine}: "
                "the same text would map to different ids"
            )
    r_addr = f"{cfg.rollout.server_ip}:{cfg.rollout.server_port}"
    serve = "`gkd rollout serve --weight-channel ...`"
    r_workers = _worker_infos(rollout, "rollout", cfg.rollout, n_rollout, serve)
    for w in r_workers:
        if int(w.get("vocab_size", -1)) != vocab:
            raise StartupError(f"rollout worker vocabulary {w.get('vocab_size')} != the student's {vocab}")
    service_limits(cfg, workers, r_workers)  # top-k, union width, lengths: LimitError (exit 2)
    teacher.vocab_size = rollout.vocab_size = vocab  # replies' ids are checked against the student's rows
    log.info(
        "services ok: teacher %s (%d workers), rollout %s; %d rollout workers expected",
        t_addr,
        len(workers),
        r_addr,
        n_rollout,
    )
