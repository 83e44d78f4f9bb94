"""Package seams: what each public import pulls in."""

import subprocess
import sys

import pytest


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"import sys\n{code}\nprint('\\n'.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return set(out.stdout.split())


def test_the_engine_contracts_and_the_step_do_not_import_zeromq():
    loaded = _modules_after("import gkd.teacher.types, gkd.rollout.types, gkd.trainer.step")
    assert "zmq" not in loaded
    assert not any(m.startswith("gkd.services.transport") for m in loaded)


def test_clients_import_from_their_packages():
    from gkd.rollout import RolloutClient, SamplingConfig
    from gkd.rollout.client import RolloutClient as Direct
    from gkd.teacher import TeacherClient
    from gkd.teacher.client import TeacherClient as DirectTeacher

    assert RolloutClient is Direct and TeacherClient is DirectTeacher
    assert SamplingConfig().max_new_tokens > 0


def test_an_unknown_attribute_is_still_an_attribute_error():
    import gkd.rollout
    import gkd.teacher

    for module in (gkd.rollout, gkd.teacher):
        with pytest.raises(AttributeError, match="NoSuchThing"):
            module.NoSuchThing  # noqa: B018


def test_dtype_names_have_one_home():
    import torch

    from gkd.config import schema
    from gkd.config.dtypes import DTYPE_NAMES, torch_dtype

    assert schema._DTYPE_NAMES is DTYPE_NAMES
    assert [torch_dtype(n) for n in DTYPE_NAMES] == [torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(ValueError, match=r"^rollout.dtype='fp8' is not one of"):
        torch_dtype("fp8", key="rollout.dtype")
