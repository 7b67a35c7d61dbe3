import inspect
import re
from pathlib import Path

from captionflow import errors
from captionflow.errors import CaptionflowError, ErrorCode

DOC = Path(__file__).parents[1] / "docs" / "errors.md"


def test_every_code_is_documented_once_with_its_kind_and_retriable_flag() -> None:
    found = re.findall(r"^\| `([a-z_]+)` \| (event|dependency|fatal) \| (yes|no) \|",
                       DOC.read_text(), re.MULTILINE)
    rows = {code: (kind, retriable) for code, kind, retriable in found}
    assert len(rows) == len(found), "a code is documented twice"
    assert set(rows) == {c.value for c in ErrorCode}
    for cls in _error_classes():
        if cls.__dict__.get("code") is not None:
            assert rows[cls.code.value] == (cls.kind.value, "yes" if cls.retriable else "no"), cls


def _error_classes() -> list[type[CaptionflowError]]:
    return [c for _, c in inspect.getmembers(errors, inspect.isclass)
            if issubclass(c, CaptionflowError)]


def test_every_concrete_error_has_its_own_code() -> None:
    leaf = [c for c in _error_classes() if not c.__subclasses__()]
    codes = [c.code for c in leaf]
    assert len(codes) == len(set(codes)), "two leaf errors share a code"


def test_instance_overrides_and_str() -> None:
    e = errors.EngineRequestFailedError("boom", retriable=False)
    assert (e.code, e.retriable, str(e)) == (ErrorCode.ENGINE_FAILED, False, "[engine_failed] boom")
    assert errors.FetchTimeoutError("t").retriable is True
    assert isinstance(errors.EngineDeadError("x"), errors.FatalError)
